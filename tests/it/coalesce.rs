//! Manifests and tokens are fetched once, like blobs: a burst of concurrent requests for the same manifest
//! (a cold tag, a tag past its freshness window, a digest) makes one upstream request, and requests refused
//! together ask the token realm once. The upstream is held until every request of a burst waits inside
//! wharf (`wharf_upstream_requests_joined_total` says so), so the bursts truly overlap.

use crate::support::fake_upstream::{Auth, FakeUpstream, REPO, client, sha256_digest};
use crate::support::registry::{Registry, http};
use crate::support::wharf::Wharf;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const BURST: usize = 16;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

/// A reverse proxy in front of the real registry that can hold manifest requests until opened.
struct GateProxy {
    url: String,
    state: Arc<ProxyState>,
}

struct ProxyState {
    target: String,
    http: reqwest::Client,
    open: watch::Sender<bool>,
    manifest_requests: AtomicUsize,
}

impl GateProxy {
    async fn start(target: String) -> GateProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let state =
            Arc::new(ProxyState { target, http, open: watch::channel(true).0, manifest_requests: AtomicUsize::new(0) });
        let app = Router::new().fallback(forward).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        GateProxy { url, state }
    }

    /// Manifest requests that reached the proxy (held or not).
    fn manifest_requests(&self) -> usize {
        self.state.manifest_requests.load(SeqCst)
    }
}

impl Drop for GateProxy {
    fn drop(&mut self) {
        self.state.open.send_replace(true);
    }
}

async fn forward(State(p): State<Arc<ProxyState>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if uri.path().contains("/manifests/") {
        p.manifest_requests.fetch_add(1, SeqCst);
        let _ = p.open.subscribe().wait_for(|open| *open).await;
    }
    let target = format!("{}{}", p.target, uri.path_and_query().map_or("/", |pq| pq.as_str()));
    let mut req = p.http.request(method, target);
    for (name, value) in headers.iter().filter(|(n, _)| *n != header::HOST) {
        req = req.header(name, value);
    }
    let Ok(resp) = req.send().await else { return StatusCode::BAD_GATEWAY.into_response() };
    let (status, headers) = (resp.status(), resp.headers().clone());
    let body = resp.bytes().await.unwrap_or_default();
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    for (name, value) in headers.iter().filter(|(n, _)| *n != header::TRANSFER_ENCODING && *n != header::CONNECTION) {
        out.headers_mut().insert(name, value.clone());
    }
    out
}

/// Uploads a blob to `repo` (POST, then a monolithic PUT); returns its digest.
fn push_blob(reg: &Registry, repo: &str, data: &[u8]) -> String {
    let digest = sha256_digest(data);
    let r = http(&reg.host(), "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"").unwrap();
    assert_eq!(r.status, 202, "start upload: {}", String::from_utf8_lossy(&r.body));
    let location = r.header("location").expect("upload Location").to_string();
    let path = location.strip_prefix(&reg.url()).unwrap_or(&location);
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http(&reg.host(), "PUT", &format!("{path}{sep}digest={digest}"), &[], data).unwrap();
    assert_eq!(r.status, 201, "finish upload: {}", String::from_utf8_lossy(&r.body));
    digest
}

fn push_manifest(reg: &Registry, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
    let uri = format!("/v2/{repo}/manifests/{reference}");
    let r = http(&reg.host(), "PUT", &uri, &[("Content-Type", media_type)], bytes).unwrap();
    assert_eq!(r.status, 201, "PUT {uri}: {}", String::from_utf8_lossy(&r.body));
}

/// `library/small`: tags `1.0` and `1.1` name an OCI index of one linux/amd64 image. Returns the index and
/// the image manifest.
fn push_small(reg: &Registry) -> (Bytes, Bytes) {
    let repo = "library/small";
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = crate::support::fake_upstream::random_bytes(10_000);
    let (config_digest, layer_digest) = (push_blob(reg, repo, config), push_blob(reg, repo, &layer));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    })
    .to_string();
    push_manifest(reg, repo, &sha256_digest(manifest.as_bytes()), OCI_MANIFEST, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": sha256_digest(manifest.as_bytes()),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    })
    .to_string();
    for tag in ["1.0", "1.1"] {
        push_manifest(reg, repo, tag, OCI_INDEX, index.as_bytes());
    }
    (index.into(), manifest.into())
}

/// `wharf_upstream_requests_joined_total{kind=KIND}`.
async fn joined(wharf: &Wharf, kind: &str) -> usize {
    wharf.metric(&format!("wharf_upstream_requests_joined_total{{kind=\"{kind}\"}}")).await as usize
}

/// Waits until `count` requests in all joined another's upstream request (`kind`), or `sent_alone` says the
/// requests went upstream one by one (the assertions after this then fail). Panics after 30 s.
async fn wait_for_joiners(wharf: &Wharf, kind: &str, count: usize, sent_alone: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while joined(wharf, kind).await < count && !sent_alone() {
        assert!(Instant::now() < deadline, "the requests never met: {} of {count} joined", joined(wharf, kind).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `BURST` identical requests while the proxy holds manifest requests, opens it once every request is
/// waiting (or more than one reached it), and returns each answer's status and body.
async fn burst(wharf: &Wharf, proxy: &GateProxy, method: Method, url: &str) -> Vec<(u16, HeaderMap, Bytes)> {
    let (before, reached) = (joined(wharf, "manifest").await, proxy.manifest_requests());
    proxy.state.open.send_replace(false);
    let http = client();
    let requests: Vec<_> = (0..BURST)
        .map(|_| {
            let req = http.request(method.clone(), url).header("accept", ACCEPT);
            tokio::spawn(async move {
                let resp = req.send().await.expect("an answer from wharf");
                let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
                (status, headers, resp.bytes().await.expect("a complete body"))
            })
        })
        .collect();
    wait_for_joiners(wharf, "manifest", before + BURST - 1, || proxy.manifest_requests() > reached + 1).await;
    proxy.state.open.send_replace(true);
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_for_one_manifest_makes_one_upstream_request() {
    let registry = Registry::start();
    let (index, manifest) = push_small(&registry);
    let proxy = GateProxy::start(registry.url()).await;
    let dir = tempfile::tempdir().unwrap();
    // Freshness window 0: every request for a known tag is past it and revalidates.
    let up = format!("docker.io={}", proxy.url);
    let args = ["--upstream", &up, "--tag-ttl", "0"].map(String::from);
    let wharf = Wharf::start(dir.path(), &args);
    let base = format!("{}/v2/library/small/manifests", wharf.url());
    let count =
        |method: &str, reference: &str| registry.count(method, &format!("/v2/library/small/manifests/{reference}"));
    let check = |what: &str, answers: &[(u16, HeaderMap, Bytes)], want: &Bytes, body: bool| {
        for (status, headers, got) in answers {
            assert_eq!(*status, 200, "{what}");
            assert_eq!(headers["docker-content-digest"], sha256_digest(want).as_str(), "{what}");
            assert_eq!(headers["content-length"], want.len().to_string().as_str(), "{what}");
            let want_body = if body { want.clone() } else { Bytes::new() };
            assert_eq!(*got, want_body, "{what}: body");
        }
    };

    // A cold tag: one GET.
    let answers = burst(&wharf, &proxy, Method::GET, &format!("{base}/1.0?ns=docker.io")).await;
    check("cold tag", &answers, &index, true);
    assert_eq!((count("GET", "1.0"), count("HEAD", "1.0")), (1, 0), "16 GETs of a cold tag upstream");

    // The same tag past its freshness window: one revalidation HEAD, no GET.
    let answers = burst(&wharf, &proxy, Method::GET, &format!("{base}/1.0?ns=docker.io")).await;
    check("tag past its freshness window", &answers, &index, true);
    assert_eq!((count("GET", "1.0"), count("HEAD", "1.0")), (1, 1), "16 revalidations of one tag upstream");

    // A cold tag asked with HEAD: one HEAD (free on Docker Hub), no GET.
    let answers = burst(&wharf, &proxy, Method::HEAD, &format!("{base}/1.1?ns=docker.io")).await;
    check("cold tag, HEAD", &answers, &index, false);
    assert_eq!((count("GET", "1.1"), count("HEAD", "1.1")), (0, 1), "16 HEADs of a cold tag upstream");

    // A cold manifest by digest: one GET.
    let digest = sha256_digest(&manifest);
    let answers = burst(&wharf, &proxy, Method::GET, &format!("{base}/{digest}?ns=docker.io")).await;
    check("cold digest", &answers, &manifest, true);
    assert_eq!(count("GET", &digest), 1, "16 GETs of a cold manifest by digest upstream");

    let coalesced = wharf.metric("wharf_cache_requests_total{kind=\"manifest\",outcome=\"coalesced\"}").await;
    assert_eq!(coalesced as usize, 3 * (BURST - 1), "the joiners of the three misses are counted as coalesced");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_refused_together_ask_for_one_token() {
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Bearer(None));
    let blobs: Vec<(String, Bytes)> = (0..BURST).map(|_| up.add_random_blob(50_000)).collect();
    let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    let other = "test/other";
    up.put_manifest(other, "v1", OCI_MANIFEST, manifest.clone());
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let http = client();

    // Sixteen different blobs: sixteen fills, each refused, then one token request for them all.
    let gate = up.gate_tokens();
    let fills: Vec<_> = blobs
        .iter()
        .map(|(digest, _)| {
            let req = http.get(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()));
            tokio::spawn(async move {
                let resp = req.send().await.expect("an answer from wharf");
                (resp.status().as_u16(), resp.bytes().await.expect("a complete body"))
            })
        })
        .collect();
    wait_for_joiners(&wharf, "token", BURST - 1, || up.token_requests() > 1).await;
    assert_eq!(up.token_requests(), 1, "16 requests refused together asked for a token each");
    assert_eq!(up.challenges(), BURST, "every fill was refused before the token arrived");
    gate.release();
    for (fill, (_, data)) in fills.into_iter().zip(&blobs) {
        let (status, body) = fill.await.unwrap();
        assert_eq!(status, 200);
        assert!(body == data, "a blob differs from the upstream's");
    }
    assert_eq!(up.token_requests(), 1, "16 requests refused together asked for a token each");

    // Sixteen requests for a cold manifest in another repository (another token scope): one manifest
    // request, refused, one token request, the same manifest request with the token.
    let gate = up.gate_tokens();
    let (gets, tokens) = (up.manifest_gets(), up.token_requests());
    let before = joined(&wharf, "manifest").await;
    let url = format!("{}/v2/{other}/manifests/v1", wharf.url());
    let requests: Vec<_> = (0..BURST)
        .map(|_| {
            let req = http.get(&url).header("accept", OCI_MANIFEST);
            tokio::spawn(async move {
                let resp = req.send().await.expect("an answer from wharf");
                (resp.status().as_u16(), resp.bytes().await.expect("a complete body"))
            })
        })
        .collect();
    wait_for_joiners(&wharf, "manifest", before + BURST - 1, || up.manifest_gets() > gets + 1).await;
    gate.release();
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!((status, body), (200, Bytes::from(manifest.clone())));
    }
    let seen = up.requests();
    let manifest_gets: Vec<_> =
        seen.iter().filter(|r| r.method == "GET" && r.path == format!("/v2/{other}/manifests/v1")).collect();
    let statuses: Vec<u16> = manifest_gets.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 200], "16 cold manifest requests upstream: {manifest_gets:?}");
    assert_eq!(up.manifest_gets() - gets, 2);
    assert_eq!(up.token_requests() - tokens, 1, "one token request for the manifest burst");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_that_started_a_fetch_may_give_up_without_failing_the_others() {
    let up = FakeUpstream::start().await;
    let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    up.put_manifest(REPO, "v1", OCI_MANIFEST, manifest.clone());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, "[server]\nrequest_timeout = 6\n").unwrap();
    let mut args = up.wharf_args();
    args.extend(["--config".into(), config.to_str().unwrap().into()]);
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let url = format!("{}/v2/{REPO}/manifests/v1", wharf.url());
    let get = || {
        let req = client().get(&url).header("accept", OCI_MANIFEST);
        tokio::spawn(async move {
            let resp = req.send().await.expect("an answer from wharf");
            (resp.status().as_u16(), resp.bytes().await.expect("a complete body"))
        })
    };

    // The first request starts the upstream GET, which is held.
    let gate = up.gate_manifests(0);
    let first = get();
    gate.wait_reached().await;
    // Later requests join it; their deadlines fire 3 s after the first one's (a deliberate offset, so the
    // first request gives up while they still wait, and they have seconds left for the answer).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let others: Vec<_> = (0..3).map(|_| get()).collect();
    wait_for_joiners(&wharf, "manifest", 3, || up.manifest_gets() > 1).await;
    let (status, _) = first.await.unwrap();
    assert_eq!(status, 503, "the first request's deadline (6 s) did not end it");
    // The upstream answers only now: the shared GET outlived the request that started it.
    gate.release();
    for r in others {
        assert_eq!(r.await.unwrap(), (200, Bytes::from(manifest.clone())), "a joiner lost the shared answer");
    }
    assert_eq!(up.manifest_gets(), 1, "the joiners started their own GET");
}
