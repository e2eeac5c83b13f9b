//! `wharf prefetch`: through a running wharf (`--server`) and straight into a data directory (`--data-dir`),
//! with `--platform` filtering an index, plain log lines when stderr is not a terminal, and a non-zero exit
//! when an image fails.

use crate::admin::{OCI_INDEX, OCI_MANIFEST, blob, manifest_json};
use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, get_ok};
use crate::support::wharf::Wharf;
use serde_json::json;
use std::path::Path;
use std::process::Output;

/// A two-platform index under `v1`; each platform's blobs are `[config, shared layer, own layer]`.
struct Multi {
    amd64: Vec<String>,
    arm64: Vec<String>,
    amd64_manifest: String,
}

fn put_multi(fake: &FakeUpstream) -> Multi {
    let common = blob(fake, 25_000);
    let mut children = Vec::new();
    let mut sets = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (config, layer) = (blob(fake, 320), blob(fake, 60_000));
        let body = manifest_json(&config, &[&common, &layer]);
        let digest = fake.put_manifest(REPO, &format!("{arch}-only"), OCI_MANIFEST, body.clone());
        children.push(json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": body.len(),
            "platform": {"os": "linux", "architecture": arch}}));
        sets.push((digest, vec![config.0, common.0.clone(), layer.0]));
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}).to_string();
    fake.put_manifest(REPO, "v1", OCI_INDEX, index);
    let (arm, amd) = (sets.pop().unwrap(), sets.pop().unwrap());
    Multi { amd64: amd.1, arm64: arm.1, amd64_manifest: amd.0 }
}

/// Runs `wharf prefetch ARGS` with stderr piped (not a terminal) and no inherited `RUST_LOG`.
async fn prefetch(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("prefetch")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(120), out).await.expect("prefetch timed out").unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Plain log lines: no terminal control sequences, no carriage returns (a progress bar would draw those).
fn assert_plain(text: &str) {
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "terminal output when stderr is a pipe:\n{text:?}");
}

fn cached(data: &Path, digests: &[String]) -> Vec<bool> {
    digests.iter().map(|d| blob_path(data, d).exists()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_through_a_running_wharf_fills_its_cache() {
    let fake = FakeUpstream::start().await;
    let multi = put_multi(&fake);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let wharf = Wharf::start(&data, &fake.wharf_args());
    let image = format!("fake.test/{REPO}:v1");
    let out = prefetch(&["--server", &wharf.url(), "--platform", "linux/arm64", &image]).await;
    let text = stderr(&out);
    assert!(out.status.success(), "prefetch failed:\n{text}");
    assert_plain(&text);
    assert!(text.lines().any(|l| l.contains("prefetch: resolved") && l.contains(&image)), "{text}");
    assert!(text.lines().any(|l| l.contains("prefetch: done") && l.contains(&image)), "{text}");

    // wharf cached the arm64 platform, and only it.
    assert_eq!(cached(&data, &multi.arm64), vec![true; 3], "arm64 blobs in wharf's cache");
    let amd_only = [multi.amd64[0].clone(), multi.amd64[2].clone()];
    assert_eq!(cached(&data, &amd_only), vec![false; 2], "--platform linux/arm64 fetched amd64 blobs");
    let upstream_gets: Vec<usize> = multi.arm64.iter().map(|d| fake.blob_gets(d)).collect();
    assert_eq!(upstream_gets, vec![1; 3]);
    // A client pulling now is served from disk.
    let c = client();
    for digest in &multi.arm64 {
        let resp = c.get(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        assert_eq!(fake.blob_gets(digest), 1, "{digest} fetched upstream again after the prefetch");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_into_a_data_directory_then_serve_it_without_the_upstream() {
    let fake = FakeUpstream::start().await;
    let multi = put_multi(&fake);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let image = format!("fake.test/{REPO}:v1");
    let upstream = format!("fake.test={}", fake.url());
    let dir = data.display().to_string();
    let out = prefetch(&["--data-dir", &dir, "--upstream", &upstream, "--platform", "linux/amd64", &image]).await;
    let text = stderr(&out);
    assert!(out.status.success(), "prefetch failed:\n{text}");
    assert_plain(&text);
    assert!(text.contains("prefetch: done"), "{text}");
    assert_eq!(cached(&data, &multi.amd64), vec![true; 3], "amd64 blobs in the data directory");
    let arm_layer = multi.arm64[2].clone();
    assert!(!blob_path(&data, &arm_layer).exists(), "--platform linux/amd64 fetched the arm64 layer");

    // A wharf on that directory serves the image (tag, platform manifest, blobs) without asking upstream.
    let gets_before = fake.manifest_gets() + fake.manifest_heads();
    let wharf = Wharf::start(&data, &fake.wharf_args());
    let c = client();
    for reference in ["v1", multi.amd64_manifest.as_str()] {
        let url = format!("{}/v2/{REPO}/manifests/{reference}", wharf.url());
        let resp = c.get(url).header("accept", format!("{OCI_INDEX}, {OCI_MANIFEST}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "manifest {reference}");
    }
    for digest in &multi.amd64 {
        let resp = c.get(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        assert_eq!(fake.blob_gets(digest), 1, "{digest} fetched upstream again");
    }
    assert_eq!(fake.manifest_gets() + fake.manifest_heads(), gets_before, "manifests were asked upstream again");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_exits_non_zero_when_an_image_fails() {
    let fake = FakeUpstream::start().await;
    let (data_blob, bytes) = fake.add_random_blob(10_000);
    let config = blob(&fake, 300);
    fake.put_manifest(REPO, "ok", OCI_MANIFEST, manifest_json(&config, &[&(data_blob.clone(), bytes.len())]));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let upstream = format!("fake.test={}", fake.url());
    let (good, missing) = (format!("fake.test/{REPO}:ok"), format!("fake.test/{REPO}:missing"));
    let dir = data.display().to_string();
    let out = prefetch(&["--data-dir", &dir, "--upstream", &upstream, &good, &missing]).await;
    let text = stderr(&out);
    assert!(!out.status.success(), "a missing image must fail the command:\n{text}");
    assert_plain(&text);
    assert!(text.contains("1 of 2 images failed") && text.contains(&missing), "{text}");
    assert!(blob_path(&data, &data_blob).exists(), "the good image was not cached");

    // The data directory of a running wharf is refused (prefetch through it instead), and left alone.
    let running = Wharf::start(&data, &fake.wharf_args());
    let out = prefetch(&["--data-dir", &dir, "--upstream", &upstream, &good]).await;
    assert!(!out.status.success() && stderr(&out).contains("in use by a running wharf"), "{}", stderr(&out));
    get_ok(&client(), &format!("{}/v2/{REPO}/blobs/{data_blob}", running.url()), &bytes).await;
    assert_eq!(fake.blob_gets(&data_blob), 1, "the running wharf lost its cache");
    assert!(!running.log().contains("unreadable"), "{}", running.log());
    drop(running);

    // Neither --server nor --data-dir: a usage error, before anything runs.
    let out = prefetch(&[&good]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A wharf that is not there fails the image, not the process with a panic.
    let wharf = Wharf::start(&tmp.path().join("other"), &fake.wharf_args());
    let url = wharf.url();
    drop(wharf);
    let out = prefetch(&["--server", &url, &good]).await;
    assert!(!out.status.success() && stderr(&out).contains(&good), "{}", stderr(&out));
}
