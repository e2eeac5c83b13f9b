//! End to end with skopeo: the seeded images (OCI index, Docker schema2, 256 MiB layer) are copied through
//! wharf into OCI layouts, by path-prefix routing (`/v2/registry.test/...`) and by `--default-registry`,
//! and every digest skopeo writes is checked against what the upstream registry holds. A second pull
//! through the same wharf must not fetch any blob (or by-digest manifest) upstream again.

use crate::support::images::{
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, TestImage, run_ok, sha256, sha256_file, skopeo,
};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(600);

fn start_wharf(data: &Path, upstream: &str, default_registry: bool) -> Wharf {
    let mut args = vec!["--upstream".to_string(), format!("registry.test={upstream}")];
    if default_registry {
        args.extend(["--default-registry".to_string(), "registry.test".to_string()]);
    }
    Wharf::start(data, &args)
}

/// `skopeo copy --all docker://WHARF/PATH:TAG oci:OUT:TAG`, then checks OUT against `image`.
fn pull(wharf: &Wharf, path: &str, image: &TestImage, out: &Path) {
    let source = format!("docker://{}/{path}:{}", wharf.addr, image.tag);
    let mut cmd = skopeo();
    cmd.args(["copy", "--all", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]);
    run_ok(cmd.arg(&source).arg(format!("oci:{}:{}", out.display(), image.tag)), TIMEOUT);
    check_layout(out, image, &source);
}

pub(crate) fn check_layout(out: &Path, image: &TestImage, source: &str) {
    let found = read_layout(out);
    if image.media_type == DOCKER_MANIFEST {
        // skopeo's oci: destination converts schema2 to OCI, rewriting the manifest and the config: only
        // the layers keep their digests (check_raw verifies the schema2 manifest and config bytes).
        let layers: BTreeSet<String> = found
            .iter()
            .filter(|(_, mt)| mt.contains(".layer.") || mt.contains(".rootfs."))
            .map(|(d, _)| d.clone())
            .collect();
        assert_eq!(layers, image.layers(), "{source}: layers in {found:?}");
        assert_eq!(found.len(), layers.len() + 2, "{source}: a converted manifest and config: {found:?}");
    } else {
        let found: BTreeSet<String> = found.into_keys().collect();
        assert_eq!(found, image.all_digests(), "{source}: every digest in the layout");
    }
}

/// Through wharf, `skopeo inspect --raw` of every manifest (by tag, then by digest) and `--config --raw`
/// of every image manifest must return the exact bytes the registry holds.
fn check_raw(wharf: &Wharf, path: &str, image: &TestImage) {
    let raw = |extra: &[&str], reference: &str| {
        let mut cmd = skopeo();
        cmd.args(["inspect", "--raw", "--tls-verify=false"]).args(extra);
        sha256(&run_ok(cmd.arg(format!("docker://{}/{reference}", wharf.addr)), TIMEOUT).stdout)
    };
    for (i, m) in image.manifests.iter().enumerate() {
        let reference = if i == 0 { format!("{path}:{}", image.tag) } else { format!("{path}@{}", m.digest) };
        assert_eq!(raw(&[], &reference), m.digest, "raw manifest bytes of {reference}");
    }
    for (manifest, config) in image.configs() {
        let reference = format!("{path}@{manifest}");
        assert_eq!(raw(&["--config"], &reference), config, "raw config bytes of {reference}");
    }
}

fn pull_all(default_registry: bool) {
    let seeded = shared();
    let tmp = tempfile::tempdir().unwrap();
    let wharf = start_wharf(&tmp.path().join("data"), &seeded.registry.url(), default_registry);
    for image in &seeded.images {
        let path = if default_registry { image.repo.clone() } else { format!("registry.test/{}", image.repo) };
        pull(&wharf, &path, image, &tmp.path().join(image.repo.replace('/', "_")));
        check_raw(&wharf, &path, image);
    }
}

#[test]
fn skopeo_pulls_every_image_by_path_prefix() {
    pull_all(false);
}

#[test]
fn skopeo_pulls_every_image_via_default_registry() {
    pull_all(true);
}

#[test]
fn skopeo_second_pull_fetches_nothing_upstream_again() {
    let seeded = shared();
    let registry = &seeded.registry;
    let tmp = tempfile::tempdir().unwrap();
    let wharf = start_wharf(&tmp.path().join("data"), &registry.url(), false);
    // Own repositories (same blobs, mounted) so other tests' traffic does not show up in the counts.
    let images: Vec<TestImage> = seeded.images.iter().map(|i| seeded.alias(&i.repo)).collect();
    for image in &images {
        let blobs = format!("/v2/{}/blobs/", image.repo);
        let by_digest = format!("/v2/{}/manifests/sha256:", image.repo);
        let path = format!("registry.test/{}", image.repo);
        pull(&wharf, &path, image, &tmp.path().join("first"));
        for (digest, _) in &image.blobs {
            let n = registry.count("GET", &format!("{blobs}{digest}"));
            assert!(n >= 1, "first pull of {path}: wharf never fetched {digest} upstream");
        }
        let (blob_gets, manifest_gets) = (registry.count("GET", &blobs), registry.count("GET", &by_digest));
        pull(&wharf, &path, image, &tmp.path().join("second"));
        let requests = registry.requests();
        let new: Vec<_> = requests.iter().filter(|r| r.uri.contains(&image.repo)).collect();
        assert_eq!(registry.count("GET", &blobs), blob_gets, "second pull of {path} fetched blobs upstream: {new:#?}");
        let n = registry.count("GET", &by_digest);
        assert_eq!(n, manifest_gets, "second pull of {path} re-fetched by-digest manifests: {new:#?}");
        std::fs::remove_dir_all(tmp.path().join("first")).unwrap();
        std::fs::remove_dir_all(tmp.path().join("second")).unwrap();
    }
}

/// Reads an OCI image layout written by a client. Panics unless every file in `blobs/sha256` hashes to its
/// name and every descriptor reachable from `index.json` names an existing blob of the stated size.
/// Returns the reachable digests (manifests, configs, layers) with their media types.
fn read_layout(dir: &Path) -> BTreeMap<String, String> {
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).expect("layout has blobs/sha256") {
        let path = entry.unwrap().path();
        let name = format!("sha256:{}", path.file_name().unwrap().to_string_lossy());
        assert_eq!(sha256_file(&path), name, "blob file {} does not hash to its name", path.display());
    }
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut found = BTreeMap::new();
    let mut todo: Vec<Value> = index["manifests"].as_array().unwrap().clone();
    while let Some(d) = todo.pop() {
        let (digest, media_type) = (d["digest"].as_str().unwrap(), d["mediaType"].as_str().unwrap_or_default());
        let path = dir.join("blobs/sha256").join(&digest[7..]);
        let len = std::fs::metadata(&path).unwrap_or_else(|_| panic!("{digest} is missing from the layout")).len();
        assert_eq!(Some(len), d["size"].as_u64(), "size of {digest} in the layout");
        if [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].contains(&media_type) {
            let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            todo.extend(v["manifests"].as_array().into_iter().flatten().cloned());
            todo.extend(v.get("config").cloned());
            todo.extend(v["layers"].as_array().into_iter().flatten().cloned());
        }
        found.insert(digest.to_string(), media_type.to_string());
    }
    found
}

/// The harness's request counting, on a per-test registry: each request is one access-log line, with its
/// query string, and the sync markers are not counted.
#[test]
fn registry_log_counts_each_request() {
    use crate::support::registry::{Registry, http};
    let registry = Registry::start();
    let uri = "/v2/x/y/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000?ns=a.test";
    for _ in 0..3 {
        assert_eq!(http(&registry.host(), "GET", uri, &[], b"").unwrap().status, 404);
    }
    assert_eq!(registry.count("GET", "/v2/x/y/blobs/sha256:0000"), 3);
    assert_eq!(registry.count("GET", "?ns=a.test"), 3);
    assert_eq!(registry.count("HEAD", "/v2/x/y/"), 0);
    assert!(registry.requests().iter().all(|r| !r.uri.contains("sync")));
}
