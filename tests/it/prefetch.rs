//! `wharf prefetch`: through a running wharf (`--server`) and straight into a data directory (`--data-dir`),
//! with `--platform` filtering an index, plain log lines when stderr is not a terminal, and a non-zero exit
//! when an image fails. The admin API's prefetch jobs: a large pull that outlives its client, the bounds on
//! running and kept jobs, and nested indexes (within and past the depth limit).

use crate::admin::{
    OCI_INDEX, OCI_MANIFEST, admin, admin_url, blob, manifest_json, start_prefetch, wait_job, with_config,
};
use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, get_ok};
use crate::support::wharf::Wharf;
use crate::warm::wait_for_pins;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// `running` jobs wharf allows at once (`admin::jobs::MAX_RUNNING`).
const MAX_RUNNING: usize = 4;
/// Finished jobs wharf keeps (`admin::jobs::KEEP_FINISHED`).
const KEEP_FINISHED: usize = 100;
/// Index nesting wharf follows, the top index included (`warm::MAX_INDEX_DEPTH`).
const MAX_INDEX_DEPTH: usize = 4;

/// A wharf on `fake` with the admin API on; returns it, its data directory and the admin URL.
fn wharf_with_admin(fake: &FakeUpstream, tmp: &Path) -> (Wharf, std::path::PathBuf, String) {
    let data = tmp.join("data");
    let wharf = Wharf::start(&data, &with_config(tmp, "[admin]\nlisten = \"127.0.0.1:0\"\n", &fake.wharf_args()));
    let api = admin_url(&wharf);
    (wharf, data, api)
}

/// Sends `POST /prefetch` on a raw connection, reads the answer's head and hangs up at once, as an impatient
/// client would. Returns the status and the `Location` header.
async fn post_and_hang_up(api: &str, body: &Value) -> (u16, String) {
    let addr = api.strip_prefix("http://").unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /prefetch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        // Far shorter than the pull, which the test holds at a gate: the answer must not wait for it.
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
        let n = read.expect("no answer to POST /prefetch within 10 s").unwrap();
        assert!(n > 0, "connection closed before the answer's head: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(conn);
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let location = text
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("location")).map(|(_, v)| v.trim()))
        .unwrap_or_else(|| panic!("no Location in {text}"));
    (status, location.to_owned())
}

/// Polls a job (its URL) until `cond` holds (30 s deadline); returns it.
async fn poll_job(url: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, job) = admin("GET", url, None, None).await;
        assert_eq!(status, 200, "{job}");
        if cond(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval, not synchronisation
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefetch_job_outlives_its_client_and_reports_progress() {
    const LAYER: usize = 32 << 20;
    const HELD: usize = 8 << 20;
    let fake = FakeUpstream::start().await;
    let (layer, layer_data) = fake.add_random_blob(LAYER);
    let config = blob(&fake, 300);
    let manifest = fake.put_manifest(REPO, "big", OCI_MANIFEST, manifest_json(&config, &[&(layer.clone(), LAYER)]));
    // The upstream holds the layer after HELD bytes until the test lets it go.
    let gate = fake.gate(&layer, HELD);
    let tmp = tempfile::tempdir().unwrap();
    let (wharf, data, api) = wharf_with_admin(&fake, tmp.path());
    let request = json!({"images": [format!("fake.test/{REPO}:big")]});

    // The answer comes at once, before the pull could have finished; the client hangs up right after it.
    let started = Instant::now();
    let (status, location) = post_and_hang_up(&api, &request).await;
    assert_eq!(status, 202, "{location}");
    assert!(started.elapsed() < Duration::from_secs(5), "202 took {:?}", started.elapsed());
    assert!(!gate.is_released());
    let job_url = format!("{api}{location}");

    // Nobody is connected, yet the job goes on: running, with partial progress, while the gate holds.
    gate.wait_reached().await;
    let total = (LAYER + config.1) as u64;
    let job = poll_job(&job_url, "the held bytes are counted", |j| {
        j["images"][0]["bytes_done"].as_u64().is_some_and(|n| n >= HELD as u64)
    })
    .await;
    assert!(!gate.is_released());
    let image = &job["images"][0];
    assert_eq!((job["state"].as_str(), image["state"].as_str()), (Some("running"), Some("running")), "{job}");
    assert_eq!(image["bytes_total"].as_u64(), Some(total), "{job}");
    assert!(image["bytes_done"].as_u64().unwrap() < total, "{job}");
    assert_eq!(image["digest"].as_str(), Some(manifest.as_str()), "{job}");

    // At most MAX_RUNNING jobs run at once: the next one is refused, not queued, and nothing is fetched for it.
    let mut others = Vec::new();
    for _ in 1..MAX_RUNNING {
        others.push(start_prefetch(&api, request.clone()).await);
    }
    let resp = client().post(format!("{api}/prefetch")).json(&request).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"), "{:?}", resp.headers());
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].is_string(), "{body}");

    // Let the layer through: the job (and those joining the same fill) finish with every byte counted.
    gate.release();
    let job = wait_job(&job_url).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["images"][0]["bytes_done"].as_u64(), Some(total), "{job}");
    assert!(job["finished"].as_u64().is_some(), "{job}");
    for url in &others {
        assert_eq!(wait_job(url).await["state"], "done");
    }
    assert_eq!(fake.blob_gets(&layer), 1, "the layer was fetched upstream more than once");
    // A slot is free again (and this job, all cached, needs nothing upstream either).
    let again = start_prefetch(&api, json!({"images": [format!("fake.test/{REPO}@{manifest}")]})).await;
    assert_eq!(wait_job(&again).await["state"], "done");

    // Cached: served afterwards without a single upstream request.
    assert!(blob_path(&data, &layer).exists() && blob_path(&data, &config.0).exists());
    let before = fake.requests().len();
    let c = client();
    get_ok(&c, &format!("{}/v2/{REPO}/blobs/{layer}", wharf.url()), &layer_data).await;
    let resp = c.get(format!("{}/v2/{REPO}/manifests/{manifest}", wharf.url())).header("accept", OCI_MANIFEST);
    assert_eq!(resp.send().await.unwrap().status(), 200);
    assert_eq!(fake.requests().len(), before, "serving the prefetched image reached the upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_prefetch_jobs_are_kept_up_to_a_bound() {
    let fake = FakeUpstream::start().await;
    let config = blob(&fake, 300);
    let digest = fake.put_manifest(REPO, "tiny", OCI_MANIFEST, manifest_json(&config, &[]));
    let tmp = tempfile::tempdir().unwrap();
    let (_wharf, _data, api) = wharf_with_admin(&fake, tmp.path());
    // By digest, so after the first every job finishes from the cache in a moment.
    let request = json!({"images": [format!("fake.test/{REPO}@{digest}")]});
    let mut jobs = Vec::new();
    for _ in 0..KEEP_FINISHED + 3 {
        let url = start_prefetch(&api, request.clone()).await;
        assert_eq!(wait_job(&url).await["state"], "done");
        jobs.push(url);
    }
    for url in &jobs[..3] {
        let (status, _) = admin("GET", url, None, None).await;
        assert_eq!(status, 404, "a job older than the last {KEEP_FINISHED} finished is still kept");
    }
    for url in &jobs[3..] {
        let (status, _) = admin("GET", url, None, None).await;
        assert_eq!(status, 200, "one of the last {KEEP_FINISHED} finished jobs was dropped");
    }
    let (_, list) = admin("GET", &format!("{api}/prefetch"), None, None).await;
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(KEEP_FINISHED), "{list}");
}

/// Puts `image` under `levels` indexes (the top one tagged `tag`): each index lists the next without a
/// platform, the innermost lists `image` as linux/amd64 next to an arm64 entry that does not exist.
fn nest(fake: &FakeUpstream, image: &str, levels: usize, tag: &str) -> Vec<String> {
    let entry = |digest: &str, mt: &str, platform: Option<&str>| {
        let mut e = json!({"mediaType": mt, "digest": digest, "size": 1});
        if let Some(arch) = platform {
            e["platform"] = json!({"os": "linux", "architecture": arch});
        }
        e
    };
    let missing = format!("sha256:{}", "0".repeat(64));
    let mut manifests = vec![entry(&missing, OCI_MANIFEST, Some("arm64")), entry(image, OCI_MANIFEST, Some("amd64"))];
    let mut digests = Vec::new();
    for level in 0..levels {
        let body = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).to_string();
        let name = if level + 1 == levels { tag.to_owned() } else { format!("{tag}-level{level}") };
        let digest = fake.put_manifest(REPO, &name, OCI_INDEX, body);
        // An image manifest without a platform next to the nested index: not a candidate, never read.
        manifests = vec![entry(&missing, OCI_MANIFEST, None), entry(&digest, OCI_INDEX, None)];
        digests.push(digest);
    }
    digests
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_walks_nested_indexes_up_to_the_depth_limit() {
    let fake = FakeUpstream::start().await;
    let (config, layer) = (blob(&fake, 300), blob(&fake, 40_000));
    let image = fake.put_manifest(REPO, "leaf", OCI_MANIFEST, manifest_json(&config, &[&layer]));
    let two = nest(&fake, &image, 2, "two");
    nest(&fake, &image, MAX_INDEX_DEPTH, "deepest");
    let too_deep = nest(&fake, &image, MAX_INDEX_DEPTH + 1, "too-deep");
    let tmp = tempfile::tempdir().unwrap();
    let (_wharf, data, api) = wharf_with_admin(&fake, tmp.path());
    let name = |tag: &str| format!("fake.test/{REPO}:{tag}");

    // index → index → manifest: every level read, the blobs cached.
    let request = json!({"images": [name("two")], "platforms": ["linux/amd64"]});
    let job = wait_job(&start_prefetch(&api, request).await).await;
    assert_eq!(job["state"], "done", "{job}");
    let result = &job["images"][0];
    assert_eq!(result["digest"].as_str(), Some(two[1].as_str()), "{job}");
    assert_eq!((result["manifests"].as_u64(), result["blobs"].as_u64()), (Some(3), Some(2)), "{job}");
    assert!(blob_path(&data, &config.0).exists() && blob_path(&data, &layer.0).exists());

    // As deep as the limit allows works; one level more is that image's error, not a hang, and the job goes
    // on to the next image.
    let images = json!([name("too-deep"), name("deepest")]);
    let job = wait_job(&start_prefetch(&api, json!({"images": images, "platforms": ["linux/amd64"]})).await).await;
    assert_eq!(job["state"], "failed", "{job}");
    let (deep, ok) = (&job["images"][0], &job["images"][1]);
    assert_eq!(deep["state"], "failed", "{job}");
    let error = deep["error"].as_str().unwrap_or_default();
    assert!(error.contains("deeper than the limit") && error.contains(&too_deep[0]), "{job}");
    assert_eq!(ok["state"], "done", "{job}");
    assert_eq!(ok["manifests"].as_u64(), Some(MAX_INDEX_DEPTH as u64 + 1), "{job}");

    // The same walk serves `wharf prefetch` (into its own data directory) ...
    let cli = tmp.path().join("cli");
    let (dir, upstream) = (cli.display().to_string(), format!("fake.test={}", fake.url()));
    let out = prefetch(&["--data-dir", &dir, "--upstream", &upstream, "--platform", "linux/amd64", &name("two")]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(blob_path(&cli, &config.0).exists() && blob_path(&cli, &layer.0).exists(), "{}", stderr(&out));
    let deep = name("too-deep");
    let out = prefetch(&["--data-dir", &dir, "--upstream", &upstream, "--platform", "linux/amd64", &deep]).await;
    assert!(!out.status.success() && stderr(&out).contains("deeper than the limit"), "{}", stderr(&out));

    // ... and the warm list, which pins every level of index along with the image.
    let warm = tmp.path().join("warm");
    std::fs::create_dir_all(&warm).unwrap();
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[warm]\ninterval = 3600\n\
         [[warm.images]]\nimage = \"{}\"\nplatforms = [\"linux/amd64\"]\n",
        name("two")
    );
    let warmed = Wharf::start(&warm.join("data"), &with_config(&warm, &toml, &fake.wharf_args()));
    let want: BTreeSet<String> = [&two[1], &two[0], &image, &config.0, &layer.0].map(String::clone).into();
    wait_for_pins(&admin_url(&warmed), &name("two"), "the nested image is pinned", |p| *p == want).await;
}
