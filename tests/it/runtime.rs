//! wharf's runtime client against the real containerd (Debian's 1.6) with its CRI image service on: an
//! image pulled through CRI comes through wharf (containerd's `hosts.toml` names wharf as the mirror), its
//! status shows the digest, and the kubelet-GC pin label is set and removed through containerd's own API.

use crate::support::containerd::{Containerd, write_hosts_dir};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use std::time::Duration;
use wharf::runtime::{PIN_LABEL, Runtime, RuntimeError};

const CALLS: Duration = Duration::from_secs(60);

/// `ctr -n k8s.io images ls` lines naming `reference`.
fn listed(ctd: &Containerd, reference: &str) -> String {
    let mut cmd = std::process::Command::new("ctr");
    cmd.arg("--address").arg(ctd.socket()).args(["-n", "k8s.io", "images", "ls"]);
    let out = crate::support::images::run_ok(&mut cmd, Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(reference)).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cri_pull_comes_through_wharf_and_the_pin_label_is_set_and_removed() {
    let seeded = shared();
    // Its own repository: the upstream counts below see only this test's traffic.
    let image = seeded.alias("test/docker");
    let tmp = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(
        &tmp.path().join("data"),
        &["--upstream".into(), format!("registry.test={}", seeded.registry.url())],
    );
    let hosts = tmp.path().join("hosts");
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    let ctd = Containerd::start_with_cri(&hosts);
    let reference = format!("registry.test/{}", image.reference());

    let runtime = Runtime::connect(&ctd.endpoint(), CALLS).await.unwrap();
    let version = runtime.version().await.unwrap();
    assert_eq!(version.name, "containerd");
    assert_eq!(runtime.image(&reference).await.unwrap(), None);
    let gets = |blob: &str| seeded.registry.count("GET", &format!("/v2/{}/blobs/{blob}", image.repo));
    let before: Vec<usize> = image.blobs.iter().map(|(blob, _)| gets(blob)).collect();
    runtime.pull(&reference).await.unwrap();
    let pulled = runtime.image(&reference).await.unwrap().expect("the runtime has the image after the pull");
    assert!(pulled.has_digest(&image.manifest_digest), "{pulled:?} is not at {}", image.manifest_digest);
    // Through wharf: every blob left the upstream once, and wharf logged the mirror's requests.
    for ((blob, _), before) in image.blobs.iter().zip(before) {
        assert_eq!(gets(blob) - before, 1, "{blob} left the upstream other than once");
    }
    let log = wharf.log();
    assert!(log.lines().any(|l| l.contains(&format!("/v2/{}/blobs/", image.repo)) && l.contains("ns=registry.test")));

    // The pin label, set and removed on the tag's record in CRI's namespace.
    runtime.set_pinned(&reference, true).await.unwrap();
    assert!(listed(&ctd, &reference).contains(&format!("{PIN_LABEL}=pinned")), "{}", listed(&ctd, &reference));
    let pinned = runtime.image(&reference).await.unwrap().unwrap().pinned;
    if version.reports_pinned() {
        assert!(pinned, "containerd {} does not report the pin", version.version);
    } else {
        eprintln!(
            "containerd {} does not report CRI `pinned` (1.7 and later do): checked the label only",
            version.version
        );
    }
    runtime.set_pinned(&reference, false).await.unwrap();
    assert!(!listed(&ctd, &reference).contains(PIN_LABEL), "{}", listed(&ctd, &reference));
    assert!(!listed(&ctd, &reference).is_empty(), "removing the label removed the image");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_runtime_socket_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", tmp.path().join("no.sock").display());
    match Runtime::connect(&endpoint, CALLS).await {
        Err(RuntimeError::Connect(at, why)) => {
            assert_eq!(at, endpoint);
            assert!(why.contains("No such file"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(Runtime::connect("tcp://127.0.0.1:1", CALLS).await, Err(RuntimeError::Endpoint(_))));
}
