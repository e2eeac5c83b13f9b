//! The admin API on its own listener: bearer token, listing, usage, eviction by digest and by image (resolved
//! from the cache alone), prefetch jobs and GC. Also the helpers the warm-list and prefetch tests share: a config
//! file, the admin URL from wharf's log, and small images for the fake upstream.

use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, get_ok};
use crate::support::wharf::Wharf;
use serde_json::{Value, json};
use std::path::Path;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Writes `toml` to `DIR/wharf.toml` and returns `--config FILE` plus `extra`.
pub fn with_config(dir: &Path, toml: &str, extra: &[String]) -> Vec<String> {
    let file = dir.join("wharf.toml");
    std::fs::write(&file, toml).unwrap();
    let mut args = vec!["--config".to_string(), file.display().to_string()];
    args.extend(extra.iter().cloned());
    args
}

/// The admin API's base URL, from the start-up log (it binds before the registry listener logs its line).
pub fn admin_url(wharf: &Wharf) -> String {
    let log = wharf.log();
    let rest = log.split("admin API on http://").nth(1).unwrap_or_else(|| panic!("no admin API line in:\n{log}"));
    let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
    format!("http://{addr}")
}

/// Sends an admin request (JSON body for POST) and returns the status and the JSON answer.
pub async fn admin(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = client().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// `POST /prefetch` with `body`: asserts `202` with a `Location` naming the job, and returns the job's URL.
pub async fn start_prefetch(api: &str, body: Value) -> String {
    let resp = client().post(format!("{api}/prefetch")).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let location = resp.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
    let job: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "{body} -> {job}");
    let id = job["id"].as_str().unwrap_or_else(|| panic!("no job id in {job}"));
    assert_eq!(location.as_deref(), Some(format!("/prefetch/{id}").as_str()), "{job}");
    format!("{api}/prefetch/{id}")
}

/// Polls a prefetch job (its URL) until it is no longer running (60 s deadline); returns it.
pub async fn wait_job(job_url: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, job) = admin("GET", job_url, None, None).await;
        assert_eq!(status, 200, "{job}");
        if job["state"] != "running" {
            return job;
        }
        assert!(std::time::Instant::now() < deadline, "the job never finished: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // poll interval, not synchronisation
    }
}

/// An OCI image manifest naming `config` and `layers` (digest, size) in the fake upstream.
pub fn manifest_json(config: &(String, usize), layers: &[&(String, usize)]) -> String {
    let d = |(digest, size): &(String, usize), mt: &str| json!({"mediaType": mt, "digest": digest, "size": size});
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": d(config, "application/vnd.oci.image.config.v1+json"),
        "layers": layers.iter().map(|l| d(l, "application/vnd.oci.image.layer.v1.tar")).collect::<Vec<_>>(),
    })
    .to_string()
}

/// A small random blob in the fake: (digest, size).
pub fn blob(fake: &FakeUpstream, size: usize) -> (String, usize) {
    (fake.add_random_blob(size).0, size)
}

/// Puts a single-platform image under `tag`: returns (manifest digest, config, layers).
pub fn put_image(fake: &FakeUpstream, repo: &str, tag: &str, layers: usize) -> (String, Vec<(String, usize)>) {
    let config = blob(fake, 300);
    let layers: Vec<_> = (0..layers).map(|i| blob(fake, 20_000 + i * 1000)).collect();
    let body = manifest_json(&config, &layers.iter().collect::<Vec<_>>());
    let digest = fake.put_manifest(repo, tag, OCI_MANIFEST, body);
    (digest, std::iter::once(config).chain(layers).collect())
}

/// Digests in a JSON array.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_is_off_by_default_and_requires_its_token() {
    let fake = FakeUpstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let plain = Wharf::start(&tmp.path().join("plain"), &fake.wharf_args());
    assert!(!plain.log().contains("admin API on"), "admin API started without admin.listen:\n{}", plain.log());
    let (status, _) = admin("GET", &format!("{}/usage", plain.url()), None, None).await;
    assert_eq!(status, 404, "the registry listener must not serve admin routes");

    let toml = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"\n";
    let wharf = Wharf::start(&tmp.path().join("data"), &with_config(tmp.path(), toml, &fake.wharf_args()));
    let usage = format!("{}/usage", admin_url(&wharf));
    let resp = client().get(&usage).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    assert!(challenge.as_deref().is_some_and(|c| c.starts_with("Bearer ")), "WWW-Authenticate: {challenge:?}");
    for wrong in ["s3cret-toke", "s3cret-token2", ""] {
        assert_eq!(admin("GET", &usage, Some(wrong), None).await.0, 401, "token {wrong:?}");
    }
    let basic = client().get(&usage).basic_auth("admin", Some("s3cret-token")).send().await.unwrap();
    assert_eq!(basic.status(), 401, "Basic credentials are not the bearer token");
    let (status, body) = admin("GET", &usage, Some("s3cret-token"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["blob_bytes"], 0);
    assert!(body["filesystem_bytes"].as_u64().unwrap() > 0, "{body}");
    assert_eq!((body["high_watermark"].as_u64(), body["low_watermark"].as_u64()), (Some(85), Some(80)));
    let (status, _) = admin("POST", &format!("{}/gc", admin_url(&wharf)), None, None).await;
    assert_eq!(status, 401, "every route needs the token");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_lists_evicts_prefetches_and_collects() {
    let fake = FakeUpstream::start().await;
    let (manifest, blobs) = put_image(&fake, REPO, "v1", 1);
    let (config, layer) = (&blobs[0], &blobs[1]);
    let (loose, loose_data) = fake.add_random_blob(50_000);
    let tmp = tempfile::tempdir().unwrap();
    // Blobs idle for a second are collectable; no background pass after the first, no disk pressure.
    let toml = "[admin]\nlisten = \"127.0.0.1:0\"\n[cache]\nmax_idle_age = 1\ngc_interval = 3600\n\
                high_watermark = 100\nlow_watermark = 100\n";
    let data = tmp.path().join("data");
    let wharf = Wharf::start(&data, &with_config(tmp.path(), toml, &fake.wharf_args()));
    let (base, api) = (wharf.url(), admin_url(&wharf));
    let c = client();

    // Pull the image through wharf.
    let resp = c.get(format!("{base}/v2/{REPO}/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    for (digest, _) in &blobs {
        assert!(!blob_path(&data, digest).exists(), "{digest} cached before the pull");
        let resp = c.get(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let (status, body) = admin("GET", &format!("{api}/repositories"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(strings(&body["repositories"][format!("fake.test/{REPO}")]), vec!["v1"], "{body}");
    let total: usize = blobs.iter().map(|(_, n)| n).sum();
    let usage_bytes = |v: Value| v["blob_bytes"].as_u64().unwrap() as usize;
    assert_eq!(usage_bytes(admin("GET", &format!("{api}/usage"), None, None).await.1), total);

    // Evict one blob by digest.
    let (status, body) = admin("DELETE", &format!("{api}/blobs/{}", layer.0), None, None).await;
    assert_eq!((status, body["evicted_bytes"].as_u64()), (200, Some(layer.1 as u64)), "{body}");
    assert!(!blob_path(&data, &layer.0).exists(), "evicted blob still on disk");
    assert_eq!(usage_bytes(admin("GET", &format!("{api}/usage"), None, None).await.1), total - layer.1);
    let (status, body) = admin("DELETE", &format!("{api}/blobs/{}", layer.0), None, None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_cached")), "{body}");
    assert_eq!(admin("DELETE", &format!("{api}/blobs/sha256:nope"), None, None).await.0, 400);

    // Evict the image by tag: resolved from the cache, the upstream is not asked.
    let before = (fake.manifest_gets(), fake.manifest_heads());
    let (status, body) = admin("DELETE", &format!("{api}/images/fake.test/{REPO}:v1"), None, None).await;
    assert_eq!(status, 200, "{body}");
    let evicted = strings(&body["evicted"]);
    assert!(evicted.contains(&config.0) && evicted.contains(&manifest), "{body}");
    assert!(!blob_path(&data, &config.0).exists(), "config still cached");
    assert_eq!((fake.manifest_gets(), fake.manifest_heads()), before, "DELETE /images contacted the upstream");
    let (status, _) = admin("DELETE", &format!("{api}/images/fake.test/{REPO}:v1"), None, None).await;
    assert_eq!(status, 404, "the image is no longer cached");

    // Prefetch it back (a job): every blob fetched upstream exactly once more, then served from disk.
    let gets = |fake: &FakeUpstream| blobs.iter().map(|(d, _)| fake.blob_gets(d)).collect::<Vec<_>>();
    let job = start_prefetch(&api, json!({"images": [format!("fake.test/{REPO}:v1")]})).await;
    let job = wait_job(&job).await;
    assert_eq!(job["state"], "done", "{job}");
    let result = &job["images"][0];
    assert_eq!((result["state"].as_str(), result["blobs"].as_u64()), (Some("done"), Some(2)), "{job}");
    assert_eq!(result["digest"].as_str(), Some(manifest.as_str()));
    assert_eq!(result["bytes_done"].as_u64(), Some(total as u64), "{job}");
    assert_eq!(result["bytes_total"].as_u64(), Some(total as u64), "{job}");
    assert_eq!(gets(&fake), vec![2, 2], "prefetch refetches each evicted blob once");
    for (digest, _) in &blobs {
        assert!(blob_path(&data, digest).exists(), "{digest} not cached by the prefetch");
        let resp = c.get(format!("{base}/v2/{REPO}/blobs/{digest}")).send().await.unwrap();
        resp.bytes().await.unwrap();
    }
    assert_eq!(gets(&fake), vec![2, 2], "a prefetched blob was fetched upstream again");
    // A missing tag fails its image (and so the job), with the cause; the other image is still pulled.
    let both = json!({"images": [format!("fake.test/{REPO}:nope"), format!("fake.test/{REPO}:v1")]});
    let job = wait_job(&start_prefetch(&api, both).await).await;
    assert_eq!(job["state"], "failed", "{job}");
    let (missing, ok) = (&job["images"][0], &job["images"][1]);
    assert_eq!(missing["state"], "failed", "{job}");
    assert!(missing["error"].as_str().is_some_and(|e| !e.is_empty()), "{job}");
    assert_eq!((ok["state"].as_str(), ok["error"].as_str()), (Some("done"), None), "{job}");
    // Bad input is refused at once, with no job.
    let url = format!("{api}/prefetch");
    let too_many = json!({"images": vec![format!("fake.test/{REPO}:v1"); 1001]});
    for bad in [json!({"images": ["Not/Valid"]}), json!({"images": []}), json!({"image": "x"}), json!([1]), too_many] {
        let (status, body) = admin("POST", &url, None, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    let resp = client().post(&url).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let (status, body) = admin("GET", &format!("{api}/prefetch/0123456789abcdef"), None, None).await;
    assert_eq!((status, body["error"].is_string()), (404, true), "{body}");
    let (status, body) = admin("GET", &url, None, None).await;
    assert_eq!((status, body["jobs"].as_array().map(Vec::len)), (200, Some(2)), "{body}");

    // GC: the loose blob goes once it has been idle for longer than max_idle_age.
    get_ok(&c, &format!("{base}/v2/{REPO}/blobs/{loose}"), &loose_data).await;
    assert!(blob_path(&data, &loose).exists());
    let mut collected = Vec::new();
    let gc = format!("{api}/gc");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !collected.contains(&loose) {
        assert!(std::time::Instant::now() < deadline, "POST /gc never evicted the idle blob");
        let (status, body) = admin("POST", &gc, None, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["needed_bytes"].is_u64(), "{body}");
        collected.extend(strings(&body["evicted_blobs"]));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await; // poll interval, not synchronisation
    }
    assert!(!blob_path(&data, &loose).exists(), "collected blob still on disk");
}
