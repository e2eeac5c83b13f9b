//! Upstream faults: broken and lying upstreams never produce a clean wrong response or a committed blob;
//! auth challenges, cross-host redirects, 429/5xx/unreachable upstreams and slow bodies are handled.

use crate::support::fake_upstream::{
    Auth, FakeUpstream, Outcome, REGISTRY, REPO, basic, blob_path, client, fetch, get_ok, headers_of, spawn_fetch,
    wait_until,
};
use crate::support::wharf::Wharf;
use std::path::Path;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Asserts a failed fill reached the client as a failure: a broken body or an error status, never a clean 200.
fn assert_not_clean(what: &str, outcome: &Outcome, size: usize) {
    match outcome {
        Outcome::Broken(s, e) => println!("{what}: {s} then a broken body ({e})"),
        Outcome::Failed(e) => println!("{what}: no response ({e})"),
        Outcome::Complete(s, _, _) if *s >= 500 => {}
        Outcome::Complete(s, _, b) => {
            panic!("{what}: expected a broken connection or 5xx, got a clean {s} with {} of {size} bytes", b.len())
        }
    }
}

fn wharf_with(up: &FakeUpstream, dir: &Path, extra: &[&str]) -> Wharf {
    let mut args = up.wharf_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    Wharf::start(dir, &args)
}

/// Writes a docker `config.json` with `entry` as the auth entry of [`REGISTRY`].
fn credentials(dir: &Path, entry: serde_json::Value) -> String {
    let path = dir.join("config.json");
    let doc = serde_json::json!({ "auths": { REGISTRY: entry } });
    std::fs::write(&path, doc.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// The content in these tests is private (only wharf's credentials reach it), so the client proves access
/// with a client token. Returns the `--config` arguments and the token's `Authorization` value.
fn client_token(dir: &Path) -> ([String; 2], String) {
    let token = "faults-client-token-0123456789";
    let path = dir.join("wharf.toml");
    let toml = format!("[[access.tokens]]\nname = \"tests\"\ntoken = \"{token}\"\nread = [\"{REGISTRY}/**\"]\n");
    std::fs::write(&path, toml).unwrap();
    (["--config".into(), path.to_str().unwrap().into()], format!("Bearer {token}"))
}

/// A client that sends `authorization` on every request.
fn client_with(authorization: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, authorization.parse().unwrap());
    reqwest::Client::builder().no_proxy().default_headers(h).build().unwrap()
}

async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.expect("a JSON error body");
    v["errors"][0]["code"].as_str().expect("errors[0].code").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_drop_mid_blob_commits_nothing_and_the_next_request_refills() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(2 * 1024 * 1024 + 11);
    up.drop_after(&digest, Some(700_000));
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &[]);
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    let outcome = fetch(&http, &url, &[]).await;
    assert_not_clean("upstream dropped mid-blob", &outcome, data.len());
    assert!(up.blob_gets(&digest) >= 1, "wharf never asked upstream");
    assert!(!blob_path(dir.path(), &digest).exists(), "a truncated blob was committed");

    up.drop_after(&digest, None);
    let before = up.blob_gets(&digest);
    get_ok(&http, &url, &data).await;
    assert!(up.blob_gets(&digest) > before, "the next request must start a fresh fill");
    let path = blob_path(dir.path(), &digest);
    wait_until("the good blob is committed", || path.is_file()).await;
    assert!(std::fs::read(&path).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_are_never_served_complete_nor_committed() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(1024 * 1024 + 3);
    up.wrong_bytes(&digest, true);
    let gate = up.gate(&digest, 64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &[]);
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    // Two clients: the one that started the fill and one that joined it while it was in progress.
    let (first, _) = spawn_fetch(&http, &url, &[]);
    gate.wait_reached().await;
    let (joiner, joined) = spawn_fetch(&http, &url, &[]);
    headers_of("a client joining the fill", joined).await;
    gate.release();
    assert_not_clean("starter of a fill with wrong bytes", &first.await.unwrap(), data.len());
    assert_not_clean("joiner of a fill with wrong bytes", &joiner.await.unwrap(), data.len());
    assert!(!blob_path(dir.path(), &digest).exists(), "bytes with the wrong digest were committed");

    up.wrong_bytes(&digest, false);
    let before = up.blob_gets(&digest);
    get_ok(&http, &url, &data).await;
    assert!(up.blob_gets(&digest) > before, "after a bad fill the next request must refetch");
    let path = blob_path(dir.path(), &digest);
    wait_until("the good blob is committed", || path.is_file()).await;
    assert!(std::fs::read(&path).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_challenge_fetches_a_token_with_configured_credentials() {
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Bearer(Some(("alice".into(), "s3cret".into()))));
    let (digest, data) = up.add_random_blob(300_000);
    let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}", "layers":[]}}"#);
    up.put_manifest(REPO, "v1", OCI_MANIFEST, body.clone());
    let dir = tempfile::tempdir().unwrap();
    let auth = basic("alice", "s3cret").to_str().unwrap().trim_start_matches("Basic ").to_string();
    let creds = credentials(dir.path(), serde_json::json!({ "auth": auth }));
    let data_dir = dir.path().join("data");
    let (config, token) = client_token(dir.path());
    let wharf = wharf_with(&up, &data_dir, &["--credentials", &creds, &config[0], &config[1]]);
    let http = client_with(&token);

    get_ok(&http, &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), &data).await;
    let resp = http.get(format!("{}/v2/{REPO}/manifests/v1", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), body.as_bytes());

    assert!(up.challenges() >= 1, "the fake never challenged: the test proves nothing");
    assert!(up.token_requests() >= 1, "wharf never asked the realm for a token");
    let seen = up.requests();
    let alice = basic("alice", "s3cret");
    // Token requests carry alice's credentials, or none: the anonymous probe that learns the repository
    // is private (SECURITY.md).
    for r in seen.iter().filter(|r| r.path.starts_with("/token")) {
        assert!(r.authorization.is_none() || r.authorization.as_deref() == Some(alice.to_str().unwrap()), "{r:?}");
        assert!(r.path.contains("scope=repository"), "token request without a scope: {}", r.path);
    }
    let with_creds = seen.iter().filter(|r| r.path.starts_with("/token") && r.authorization.is_some()).count();
    assert!(with_creds >= 1, "wharf never offered its credentials to the realm");
    let ok_blob =
        seen.iter().find(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status == 200).expect("blob GET");
    assert!(ok_blob.authorization.as_deref().unwrap_or("").starts_with("Bearer tok-"));
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_bearer_token_and_basic_challenge() {
    // Anonymous token flow: the token request carries no credentials.
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Bearer(None));
    let (digest, data) = up.add_random_blob(100_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &[]);
    get_ok(&client(), &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), &data).await;
    assert!(up.token_requests() >= 1);
    assert!(up.requests().iter().filter(|r| r.path.starts_with("/token")).all(|r| r.authorization.is_none()));

    // A plain Basic challenge, credentials given as username/password fields.
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Basic("bob".into(), "pw".into()));
    let (digest, data) = up.add_random_blob(100_000);
    let dir = tempfile::tempdir().unwrap();
    let creds = credentials(dir.path(), serde_json::json!({"username": "bob", "password": "pw"}));
    let (config, token) = client_token(dir.path());
    let wharf = wharf_with(&up, &dir.path().join("data"), &["--credentials", &creds, &config[0], &config[1]]);
    get_ok(&client_with(&token), &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), &data).await;
    let seen = up.requests();
    let ok_blob =
        seen.iter().find(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status == 200).expect("blob GET");
    assert_eq!(ok_blob.authorization.as_deref(), Some(basic("bob", "pw").to_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn redirect_to_another_host_never_carries_authorization() {
    for auth in [Auth::Bearer(Some(("alice".into(), "pw".into()))), Auth::Basic("alice".into(), "pw".into())] {
        let up = FakeUpstream::start().await;
        up.set_auth(auth.clone());
        up.redirect_blobs(true);
        let (digest, data) = up.add_random_blob(500_000);
        let dir = tempfile::tempdir().unwrap();
        let creds = credentials(dir.path(), serde_json::json!({"username": "alice", "password": "pw"}));
        let (config, token) = client_token(dir.path());
        let wharf = wharf_with(&up, &dir.path().join("data"), &["--credentials", &creds, &config[0], &config[1]]);
        get_ok(&client_with(&token), &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), &data).await;

        let seen = up.requests();
        let main = seen.iter().find(|r| r.listener == "main" && r.status == 307).expect("redirected GET");
        assert!(main.authorization.is_some(), "{auth:?}: the registry host got no credentials");
        let cdn: Vec<_> = seen.iter().filter(|r| r.listener == "cdn").collect();
        assert!(!cdn.is_empty(), "{auth:?}: wharf did not follow the redirect");
        for r in cdn {
            assert_eq!(
                r.authorization, None,
                "{auth:?}: Authorization leaked from {} to {} ({r:?})",
                up.addr, up.cdn_addr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_ttl_then_head_revalidation_then_stale_if_error() {
    let mut up = FakeUpstream::start().await;
    // Odd spacing: wharf must serve these exact bytes, not a re-serialization.
    let v1 = format!("{{ \"schemaVersion\": 2,\n  \"mediaType\": \"{OCI_MANIFEST}\",  \"layers\": [] }}");
    let d1 = up.put_manifest(REPO, "v1", OCI_MANIFEST, v1.clone());
    let http = client();
    let check = async |url: &str, want: &str, ctx: &str| {
        let resp = http.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{ctx}");
        assert_eq!(resp.headers()["content-type"], OCI_MANIFEST, "{ctx}");
        assert_eq!(resp.bytes().await.unwrap(), want.as_bytes(), "{ctx}: body not byte-exact");
    };

    // Within the freshness window, no upstream request at all.
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &["--tag-ttl", "3600"]);
    let tag_url = format!("{}/v2/{REPO}/manifests/v1", wharf.url());
    check(&tag_url, &v1, "first fetch").await;
    let n = up.manifest_gets() + up.manifest_heads();
    check(&tag_url, &v1, "fresh tag").await;
    assert_eq!(up.manifest_gets() + up.manifest_heads(), n, "a fresh tag must not go upstream");
    drop(wharf);

    // TTL 0: every request revalidates with a HEAD; unchanged digest → no GET; changed → new body.
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &["--tag-ttl", "0"]);
    let tag_url = format!("{}/v2/{REPO}/manifests/v1", wharf.url());
    let digest_url = format!("{}/v2/{REPO}/manifests/{d1}", wharf.url());
    check(&tag_url, &v1, "first fetch").await;
    let (gets, heads) = (up.manifest_gets(), up.manifest_heads());
    check(&tag_url, &v1, "revalidated tag").await;
    assert!(up.manifest_heads() > heads, "an expired tag must be revalidated with a HEAD upstream");
    assert_eq!(up.manifest_gets(), gets, "an unchanged digest must not be fetched again");
    let v2 = v1.replace("\"layers\"", "\"annotations\": {}, \"layers\"");
    up.put_manifest(REPO, "v1", OCI_MANIFEST, v2.clone());
    check(&tag_url, &v2, "tag moved upstream").await;
    up.put_manifest(REPO, "v1", OCI_MANIFEST, v1.clone());
    check(&tag_url, &v1, "tag moved back").await;

    // Upstream failing: the last known manifest is served; unknown tags and cold blobs are 503.
    let (cold, _) = up.add_random_blob(1000);
    for status in [429, 500, 503] {
        up.fail_with(Some(status));
        let n = up.manifest_gets() + up.manifest_heads();
        check(&tag_url, &v1, &format!("stale tag while upstream answers {status}")).await;
        assert!(up.manifest_gets() + up.manifest_heads() > n, "wharf did not try upstream ({status})");
        check(&digest_url, &v1, &format!("manifest by digest while upstream answers {status}")).await;
        let resp = http.get(format!("{}/v2/{REPO}/manifests/nope", wharf.url())).send().await.unwrap();
        assert_eq!(resp.status(), 503, "unknown tag while upstream answers {status}");
        println!("upstream {status} → unknown tag error code {}", error_code(resp).await);
        let resp = http.get(format!("{}/v2/{REPO}/blobs/{cold}", wharf.url())).send().await.unwrap();
        assert_eq!(resp.status(), 503, "cold blob while upstream answers {status}");
        println!("upstream {status} → cold blob error code {}", error_code(resp).await);
    }
    up.stop().await;
    check(&tag_url, &v1, "stale tag while upstream is unreachable").await;
    let resp = http.get(format!("{}/v2/{REPO}/manifests/nope", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 503, "unknown tag while upstream is unreachable");
    let resp = http.get(format!("{}/v2/{REPO}/blobs/{cold}", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 503, "cold blob while upstream is unreachable");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_upstream_content_is_404_with_oci_codes() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &[]);
    let http = client();
    let missing = format!("sha256:{}", "ab".repeat(32));
    let resp = http.get(format!("{}/v2/{REPO}/blobs/{missing}", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    let resp = http.get(format!("{}/v2/{REPO}/manifests/nope", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_first_bytes_reach_the_client_before_the_upstream_finishes() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(2 * 1024 * 1024);
    // Less than the writer's batch (256 KiB): the bytes must go out after the batch delay, not wait for it
    // to fill.
    let gate = up.gate(&digest, 100 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let wharf = wharf_with(&up, dir.path(), &[]);
    let mut resp = client()
        .get(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()))
        .send()
        .await
        .expect("headers while the upstream body is held");
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
        .await
        .expect("no body bytes while the upstream is held: wharf waits for the whole blob")
        .unwrap()
        .expect("a first chunk");
    assert!(!first.is_empty() && !gate.is_released(), "first bytes arrived before the upstream finished");
    gate.release();
    let mut body = first.to_vec();
    while let Some(c) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&c);
    }
    assert!(body == data, "streamed body differs from the blob");
}

/// Writes `toml` as wharf's config file in `dir`; returns the `--config` arguments.
fn config(dir: &Path, toml: &str) -> [String; 2] {
    let path = dir.join("limits.toml");
    std::fs::write(&path, toml).unwrap();
    ["--config".into(), path.to_str().unwrap().into()]
}

/// GETs `url` and expects `503 UNAVAILABLE`; returns the error detail and how long the answer took.
async fn unavailable(url: &str) -> (String, Duration) {
    let started = Instant::now();
    let resp = client().get(url).header("accept", OCI_MANIFEST).send().await.expect("an answer from wharf");
    let took = started.elapsed();
    assert_eq!(resp.status(), 503, "{url}");
    let v: serde_json::Value = resp.json().await.expect("a JSON error body");
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "{url}: {v}");
    (v["errors"][0]["detail"].as_str().unwrap_or_default().to_string(), took)
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_ends_a_connect_nobody_answers() {
    // A listener whose accept queue is full and never drained: the kernel drops further SYNs, so a connect
    // gets no answer at all, as behind a firewall that drops packets.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let hole = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(hole)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("a connect to the full listener was refused instead of left unanswered: {e}"),
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    // Only the connect timeout is short: the request deadline and the read timeout are a minute away.
    let dir = tempfile::tempdir().unwrap();
    let toml = "[server]\nrequest_timeout = 60\n[upstream]\nconnect_timeout = 1\nread_timeout = 60\n";
    let mut args = vec!["--upstream".into(), format!("hole.test=http://{hole}"), "--default-registry".into()];
    args.extend(["hole.test".into()].into_iter().chain(config(dir.path(), toml)));
    let wharf = Wharf::start(&dir.path().join("data"), &args);

    let (detail, took) = unavailable(&format!("{}/v2/team/app/manifests/latest", wharf.url())).await;
    println!("unanswered connect: 503 after {took:.2?} ({detail})");
    assert!(took >= Duration::from_millis(900), "answered before the connect timeout: {took:?} ({detail})");
    assert!(took < Duration::from_secs(10), "the connect timeout (1 s) did not end the connect: {took:?}");
    drop((queued, listener));
}

/// wharf with only the read timeout short (1 s): the request deadline is a minute away (and does not apply to
/// a body that has started), the connect timeout 10 s.
fn short_read_timeout(up: &FakeUpstream, dir: &Path) -> Wharf {
    let toml = "[server]\nrequest_timeout = 60\n[upstream]\nconnect_timeout = 10\nread_timeout = 1\n";
    wharf_with(up, &dir.join("data"), &config(dir, toml).each_ref().map(String::as_str))
}

#[tokio::test(flavor = "multi_thread")]
async fn read_timeout_ends_a_manifest_that_stalls_mid_body() {
    let up = FakeUpstream::start().await;
    let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    up.put_manifest(REPO, "v1", OCI_MANIFEST, manifest);
    let dir = tempfile::tempdir().unwrap();
    let wharf = short_read_timeout(&up, dir.path());

    // The body stops after 10 bytes: the request fails within seconds, not at its deadline.
    let gate = up.gate_manifests(10);
    let (detail, took) = unavailable(&format!("{}/v2/{REPO}/manifests/v1", wharf.url())).await;
    println!("manifest stalled mid-body: 503 after {took:.2?} ({detail})");
    assert!(!gate.is_released());
    assert!(took >= Duration::from_millis(900), "answered before the read timeout: {took:?} ({detail})");
    assert!(took < Duration::from_secs(10), "the read timeout (1 s) did not end the stalled manifest: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn read_timeout_ends_a_blob_that_stalls_mid_body() {
    let up = FakeUpstream::start().await;
    let (digest, _) = up.add_random_blob(1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let wharf = short_read_timeout(&up, dir.path());

    // The body stops after 64 KiB: the client's body breaks within seconds of the stall. Nothing else ends
    // it: the request deadline covers only the wait for the first byte.
    let gate = up.gate(&digest, 64 * 1024);
    let resp = client().get(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    gate.wait_reached().await;
    let stalled = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(30), resp.bytes())
        .await
        .expect("the body was still open 30 s after the upstream stalled: no read timeout");
    let took = stalled.elapsed();
    assert!(body.is_err(), "a stalled fill ended in a clean body of {} bytes", body.map_or(0, |b| b.len()));
    println!("blob stalled mid-body: client body broken {took:.2?} after the stall");
    assert!(took < Duration::from_secs(10), "the read timeout (1 s) did not end the stalled blob: {took:?}");
    assert!(!gate.is_released() && !blob_path(&dir.path().join("data"), &digest).exists());
}

/// A manifest of exactly `len` bytes (`pad` repeated in an annotation).
fn manifest_of(len: usize, pad: char) -> String {
    let head = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[],"annotations":{{"pad":""#);
    let tail = r#""}}"#;
    format!("{head}{}{tail}", pad.to_string().repeat(len - head.len() - tail.len()))
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_up_to_4_mib_are_served_and_larger_ones_refused_before_the_rest_arrives() {
    const MAX: usize = 4 * 1024 * 1024;
    let up = FakeUpstream::start().await;
    let (max, over) = (manifest_of(MAX, 'a'), manifest_of(MAX + 1, 'b'));
    up.put_manifest(REPO, "max", OCI_MANIFEST, max.clone());
    up.put_manifest(REPO, "over", OCI_MANIFEST, over);
    let (max_chunked, over_chunked) = (manifest_of(MAX, 'c'), manifest_of(MAX + 64 * 1024, 'd'));
    up.put_manifest(REPO, "max-chunked", OCI_MANIFEST, max_chunked.clone());
    up.put_manifest(REPO, "over-chunked", OCI_MANIFEST, over_chunked);
    let dir = tempfile::tempdir().unwrap();
    // The other limits are far away: a minute for the request, a minute per stalled read.
    let toml = "[server]\nrequest_timeout = 60\n[upstream]\nread_timeout = 60\n";
    let wharf = wharf_with(&up, &dir.path().join("data"), &config(dir.path(), toml).each_ref().map(String::as_str));
    let url = |tag: &str| format!("{}/v2/{REPO}/manifests/{tag}", wharf.url());
    let served = async |tag: &str, want: &str| {
        let resp = client().get(url(tag)).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{tag}");
        assert!(resp.bytes().await.unwrap() == want.as_bytes(), "{tag}: body differs");
    };

    // With Content-Length: 4 MiB is served; one byte more is refused from the headers alone, while the body
    // is still held upstream.
    served("max", &max).await;
    let gate = up.gate_manifests(0);
    let (detail, took) = unavailable(&url("over")).await;
    println!("4 MiB + 1 with Content-Length: 503 after {took:.2?} ({detail})");
    assert!(detail.contains("larger than 4 MiB"), "refused for another reason: {detail}");
    assert!(took < Duration::from_secs(10) && !gate.is_released(), "not refused before the body: {took:?}");

    // Without Content-Length (chunked): 4 MiB is served; a larger body is refused once 4 MiB + 1 bytes have
    // arrived, while the rest is still held upstream.
    up.chunked_manifests(true);
    let gate = up.gate_manifests(MAX + 1);
    served("max-chunked", &max_chunked).await;
    let (detail, took) = unavailable(&url("over-chunked")).await;
    println!("4 MiB + 64 KiB chunked: 503 after {took:.2?} ({detail})");
    assert!(detail.contains("larger than 4 MiB"), "refused for another reason: {detail}");
    assert!(took < Duration::from_secs(10) && !gate.is_released(), "not refused at 4 MiB + 1: {took:?}");
}
