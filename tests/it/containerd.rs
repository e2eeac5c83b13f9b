//! End to end with containerd 1.6: `ctr content fetch --hosts-dir` pulls the seeded images through wharf,
//! configured as the only pull/resolve host for `registry.test` (so containerd adds `?ns=registry.test`),
//! and every manifest, config and layer must land in containerd's content store.

use crate::support::containerd::{Containerd, write_hosts_dir};
use crate::support::images::TestImage;
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use std::path::Path;

fn start_wharf(data: &Path, upstream: &str) -> Wharf {
    Wharf::start(data, &["--upstream".to_string(), format!("registry.test={upstream}")])
}

fn assert_in_store(ctd: &Containerd, image: &TestImage) {
    let store = ctd.content_digests();
    let missing: Vec<_> = image.all_digests().into_iter().filter(|d| !store.contains(d)).collect();
    assert!(missing.is_empty(), "{}: not in containerd's content store: {missing:?}", image.reference());
}

#[test]
fn containerd_fetches_every_image_through_wharf() {
    let seeded = shared();
    let tmp = tempfile::tempdir().unwrap();
    let wharf = start_wharf(&tmp.path().join("data"), &seeded.registry.url());
    let hosts = tmp.path().join("hosts");
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    let ctd = Containerd::start();
    for image in &seeded.images {
        ctd.fetch_ok(&hosts, &format!("registry.test/{}", image.reference()));
        assert_in_store(&ctd, image);
        let log = wharf.log();
        let manifests = format!("/v2/{}/manifests/", image.repo);
        let blobs = format!("/v2/{}/blobs/", image.repo);
        for wanted in [manifests, blobs] {
            assert!(
                log.lines().any(|l| l.contains(&wanted) && l.contains("ns=registry.test")),
                "wharf logged no request for {wanted}...?ns=registry.test:\n{log}"
            );
        }
    }
}

#[test]
fn containerd_second_fetch_is_served_from_wharf_cache() {
    let seeded = shared();
    let registry = &seeded.registry;
    let tmp = tempfile::tempdir().unwrap();
    let wharf = start_wharf(&tmp.path().join("data"), &registry.url());
    let hosts = tmp.path().join("hosts");
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    for repo in ["test/multi", "test/docker"] {
        let image = seeded.alias(repo); // own repository: the counts below see only this test's traffic
        let reference = format!("registry.test/{}", image.reference());
        let blobs = format!("/v2/{}/blobs/", image.repo);
        let first = Containerd::start();
        first.fetch_ok(&hosts, &reference);
        assert_in_store(&first, &image);
        let upstream_gets = registry.count("GET", &blobs);
        assert!(upstream_gets >= image.blobs.len(), "wharf fetched {upstream_gets} blobs of {reference} upstream");
        drop(first);
        let second = Containerd::start(); // empty content store: every blob is requested again
        second.fetch_ok(&hosts, &reference);
        assert_in_store(&second, &image);
        let requests = registry.requests();
        let seen: Vec<_> = requests.iter().filter(|r| r.uri.contains(&image.repo)).collect();
        assert_eq!(registry.count("GET", &blobs), upstream_gets, "second fetch went upstream: {seen:#?}");
    }
}

/// Controls for the harness itself: the seeded images are fetchable straight from the registry, and a
/// hosts.toml whose mirror is down fails (its `server` is unreachable), so the fetches above used wharf.
#[test]
fn containerd_harness_controls() {
    let seeded = shared();
    let tmp = tempfile::tempdir().unwrap();
    let ctd = Containerd::start();
    let (direct, dead) = (tmp.path().join("direct"), tmp.path().join("dead"));
    write_hosts_dir(&direct, "registry.test", &seeded.registry.url());
    write_hosts_dir(&dead, "registry.test", "http://127.0.0.1:1");
    let image = seeded.image("test/multi");
    let out = ctd.fetch(&dead, &format!("registry.test/{}", image.reference()));
    assert!(!out.status.success(), "fetch with no reachable host succeeded");
    ctd.fetch_ok(&direct, &format!("registry.test/{}", image.reference()));
    assert_in_store(&ctd, image);
}
