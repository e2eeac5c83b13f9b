//! The warm list: images pre-pulled at start-up from the real registry (so a later pull makes no upstream
//! blob request), pinned (admin `GET /pins`), filtered by platform, reported in `/metrics`; and a warm tag
//! that moves upstream hands its pins over to the new digests.

use crate::admin::{OCI_MANIFEST, admin, admin_url, blob, manifest_json, strings, with_config};
use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, wait_until};
use crate::support::images::{TestImage, run_ok, skopeo};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// The pins of `image` from the admin API (empty when it has none).
pub async fn pins_of(api: &str, image: &str) -> BTreeSet<String> {
    let (status, body) = admin("GET", &format!("{api}/pins"), None, None).await;
    assert_eq!(status, 200, "{body}");
    body["pins"].get(image).map(|v| strings(v).into_iter().collect()).unwrap_or_default()
}

/// Polls `/pins` until `image`'s pins satisfy `cond` (30 s deadline); returns them.
pub async fn wait_for_pins(
    api: &str,
    image: &str,
    what: &str,
    cond: impl Fn(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pins = pins_of(api, image).await;
        if cond(&pins) {
            return pins;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}; pins of {image}: {pins:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The (manifest digest, its config and layer digests) of the `arch` platform of a seeded index.
fn platform_of(image: &TestImage, arch: &str) -> (String, BTreeSet<String>) {
    let index: Value = serde_json::from_slice(&image.manifests[0].bytes).unwrap();
    let entry = index["manifests"].as_array().unwrap().iter().find(|m| m["platform"]["architecture"] == arch);
    let digest = entry.unwrap()["digest"].as_str().unwrap().to_owned();
    let m = image.manifests.iter().find(|m| m.digest == digest).unwrap();
    let v: Value = serde_json::from_slice(&m.bytes).unwrap();
    let blobs = std::iter::once(&v["config"]).chain(v["layers"].as_array().unwrap());
    (digest.clone(), blobs.map(|d| d["digest"].as_str().unwrap().to_owned()).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_list_prepulls_and_pins_seeded_images_so_a_pull_fetches_nothing_upstream() {
    let (seeded, arm, multi, docker) = tokio::task::spawn_blocking(|| {
        let seeded = shared();
        // Own repositories, so the registry's access log counts only this test's requests.
        (seeded, seeded.alias("test/multi"), seeded.alias("test/multi"), seeded.alias("test/docker"))
    })
    .await
    .unwrap();
    let registry = &seeded.registry;
    let name = |i: &TestImage| format!("registry.test/{}:v1", i.repo);
    // The arm64-only image comes first, so its blobs are fetched from its own repository.
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[warm]\ninterval = 3600\n\
         [[warm.images]]\nimage = \"{}\"\nplatforms = [\"linux/arm64\"]\n\
         [[warm.images]]\nimage = \"{}\"\nplatforms = [\"linux/amd64\", \"linux/arm64\"]\n\
         [[warm.images]]\nimage = \"{}\"\n",
        name(&arm),
        name(&multi),
        name(&docker)
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let upstream = vec!["--upstream".to_string(), format!("registry.test={}", registry.url())];
    let wharf = Wharf::start(&data, &with_config(tmp.path(), &toml, &upstream));
    let api = admin_url(&wharf);

    // Ready once every blob is cached (pins are set before the blobs land, so wait for this first).
    let metrics_url = format!("{}/metrics", wharf.url());
    let ready_lines: Vec<String> =
        [&arm, &multi, &docker].iter().map(|i| format!("wharf_warm_image_ready{{image=\"{}\"}} 1", name(i))).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let text = client().get(&metrics_url).send().await.unwrap().text().await.unwrap();
        if ready_lines.iter().all(|l| text.contains(l.as_str())) {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "warm images never became ready:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Pinned: every manifest and blob of the whole image (both platforms, or the single manifest).
    for image in [&multi, &docker] {
        let want = image.all_digests();
        let got = wait_for_pins(&api, &name(image), "the warm list pins the image", |p| *p == want).await;
        assert_eq!(got, want);
    }
    // Only the arm64 platform of the arm64-only entry: pinned, and fetched from its repository.
    let (arm_manifest, arm_blobs) = platform_of(&arm, "arm64");
    let (_, amd_blobs) = platform_of(&arm, "amd64");
    let mut want: BTreeSet<String> = arm_blobs.clone();
    want.extend([arm.manifest_digest.clone(), arm_manifest]);
    let got = wait_for_pins(&api, &name(&arm), "the arm64 entry is pinned", |p| !p.is_empty()).await;
    assert_eq!(got, want, "pins of the arm64-only entry");
    for digest in &amd_blobs - &arm_blobs {
        let n = registry.count("GET", &format!("/v2/{}/blobs/{digest}", arm.repo));
        assert_eq!(n, 0, "{digest} (amd64 only) fetched for the arm64-only entry");
    }
    for digest in &arm_blobs {
        assert_eq!(registry.count("GET", &format!("/v2/{}/blobs/{digest}", arm.repo)), 1, "{digest}");
    }

    // A refresh time in /metrics, and every blob on disk before any client asked.
    for image in [&arm, &multi, &docker] {
        let ts = format!("wharf_warm_image_last_success_timestamp_seconds{{image=\"{}\"}} ", name(image));
        let value = metrics.lines().find_map(|l| l.strip_prefix(ts.as_str())).unwrap_or("0");
        assert!(value.parse::<f64>().unwrap() > 1.7e9, "{ts}{value}");
    }
    let on_disk = multi.blobs.iter().chain(&docker.blobs).map(|(d, _)| d).chain(&arm_blobs);
    for digest in on_disk {
        assert!(blob_path(&data, digest).exists(), "{digest} not on disk");
    }

    // A full pull through wharf now fetches no blob and no by-digest manifest upstream.
    for image in [&multi, &docker] {
        let blobs = format!("/v2/{}/blobs/", image.repo);
        let by_digest = format!("/v2/{}/manifests/sha256:", image.repo);
        let before = (registry.count("GET", &blobs), registry.count("GET", &by_digest));
        // (The arm64-only entry, warmed first, already fetched the blobs the platforms share.)
        assert!(before.0 >= 1, "the warm list never fetched {}'s blobs upstream", image.repo);
        let out = tmp.path().join(image.repo.replace('/', "_"));
        let source = format!("docker://{}/registry.test/{}:v1", wharf.addr, image.repo);
        let dest = format!("oci:{}:v1", out.display());
        tokio::task::spawn_blocking(move || {
            let mut cmd = skopeo();
            cmd.args(["copy", "--all", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]);
            run_ok(cmd.arg(&source).arg(&dest), Duration::from_secs(300));
        })
        .await
        .unwrap();
        let after = (registry.count("GET", &blobs), registry.count("GET", &by_digest));
        assert_eq!(after, before, "pulling warm {} reached the upstream for blobs or manifests", image.repo);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_moved_warm_tag_unpins_the_old_digests() {
    let fake = FakeUpstream::start().await;
    let shared_layer = blob(&fake, 40_000);
    let (config1, layer1, config2, layer2) =
        (blob(&fake, 300), blob(&fake, 30_000), blob(&fake, 310), blob(&fake, 31_000));
    let m1 = fake.put_manifest(REPO, "stable", OCI_MANIFEST, manifest_json(&config1, &[&shared_layer, &layer1]));
    let image = format!("fake.test/{REPO}:stable");
    let toml =
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[warm]\ninterval = 1\n[[warm.images]]\nimage = \"{image}\"\n");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut args = fake.wharf_args();
    args.extend(["--tag-ttl".to_string(), "0".to_string()]);
    let wharf = Wharf::start(&data, &with_config(tmp.path(), &toml, &args));
    let api = admin_url(&wharf);

    let first: BTreeSet<String> = [&m1, &config1.0, &shared_layer.0, &layer1.0].map(String::clone).into();
    wait_for_pins(&api, &image, "the first digest is pinned", |p| *p == first).await;
    // Pins are set as soon as the digests are known; the blobs land after.
    wait_until("the first layer is cached", || blob_path(&data, &layer1.0).exists()).await;
    let (status, body) = admin("DELETE", &format!("{api}/blobs/{}", layer1.0), None, None).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("pinned")), "a pinned blob was evicted: {body}");
    assert!(blob_path(&data, &layer1.0).exists(), "refused eviction removed the file");

    // The tag moves upstream: the next pass pins the new image and releases what only the old one used.
    let m2 = fake.put_manifest(REPO, "stable", OCI_MANIFEST, manifest_json(&config2, &[&shared_layer, &layer2]));
    let second: BTreeSet<String> = [&m2, &config2.0, &shared_layer.0, &layer2.0].map(String::clone).into();
    wait_for_pins(&api, &image, "the moved tag's new digest is pinned", |p| *p == second).await;
    wait_until("the new layer is cached", || blob_path(&data, &layer2.0).exists()).await;
    let (status, body) = admin("DELETE", &format!("{api}/blobs/{}", layer1.0), None, None).await;
    assert_eq!((status, body["evicted_bytes"].as_u64()), (200, Some(layer1.1 as u64)), "old layer: {body}");
    let (status, _) = admin("DELETE", &format!("{api}/blobs/{}", shared_layer.0), None, None).await;
    assert_eq!(status, 409, "a layer the new image still uses lost its pin");
    assert_eq!(fake.blob_gets(&shared_layer.0), 1, "the shared layer was fetched again after the tag moved");
}
