//! An in-process fake upstream registry (axum on 127.0.0.1:0) serving blobs and manifests from memory,
//! with per-route counters, a log of the `Authorization` header each request carried, and runtime fault
//! knobs: dropped connections, wrong bytes, bearer/basic challenges, 429/5xx, cross-host redirects, gates, and
//! a seeded flapping mode ([`FakeUpstream::start_flapping`]) mixing bursts of resets, 5xx/429, cut and stalled
//! bodies and wrong bytes.

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::serve::{IncomingStream, Listener};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The registry name tests configure wharf with (`--upstream fake.test=URL`).
pub const REGISTRY: &str = "fake.test";
/// Repository used by tests that do not care.
pub const REPO: &str = "test/app";
const CHUNK: usize = 32 * 1024;
const DIGEST_HEADER: HeaderName = HeaderName::from_static("docker-content-digest");

/// How the fake authenticates `/v2/` requests.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// Everything is public.
    #[default]
    Anonymous,
    /// `401 Bearer realm=<this>/token`; the token endpoint wants these Basic credentials (`None`: anonymous).
    Bearer(Option<(String, String)>),
    /// `401 Basic`; requests must carry these credentials.
    Basic(String, String),
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `main` or `cdn` (the redirect target).
    pub listener: &'static str,
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub status: u16,
}

/// Holds a blob's body after `after` bytes until [`Gate::release`]; applies to every GET of that digest.
pub struct Gate {
    after: usize,
    reached: watch::Sender<bool>,
    released: watch::Sender<bool>,
}

impl Gate {
    /// Waits until some response has sent the first `after` bytes and is now held (panics after 30 s).
    pub async fn wait_reached(&self) {
        let mut rx = self.reached.subscribe();
        let ok = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r)).await;
        assert!(ok.is_ok(), "the upstream never got to the gate ({} bytes): wharf did not fetch the blob", self.after);
    }
    /// Lets held and future responses finish.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
    /// Whether the test released the gate (an upstream response cannot have finished before this).
    pub fn is_released(&self) -> bool {
        *self.released.borrow()
    }
}

#[derive(Default)]
struct Faults {
    drop_after: HashMap<String, usize>,
    wrong_bytes: HashSet<String>,
    fail_with: Option<u16>,
    auth: Auth,
    redirect_blobs: bool,
    gates: HashMap<String, Arc<Gate>>,
    /// Answer `Range: bytes=a-b` with 206 (off by default: a plain registry behaviour wharf must also handle).
    honor_ranges: bool,
    /// Break the next `n` ranged responses that cover this absolute offset: digest → (offset, n).
    drop_range: HashMap<String, (usize, usize)>,
    /// With bearer auth: repositories anonymous tokens may read (`None`: anonymous token requests fail
    /// when credentials are configured). Docker Hub hands every client a token, with access to public
    /// repositories only.
    public_repos: Option<HashSet<String>>,
    /// Digest → the only repositories that have the blob (unlisted digests are in every repository).
    blob_repos: HashMap<String, HashSet<String>>,
    flapping: Option<Flapping>,
    /// How many requests each flap was applied to (kept after the flapping stops).
    flaps: HashMap<Flap, usize>,
    /// Holds every token response until released.
    token_gate: Option<Arc<Gate>>,
    /// Holds every manifest GET body after `after` bytes until released.
    manifest_gate: Option<Arc<Gate>>,
    /// Manifest GETs without `Content-Length` (a chunked body), as some registries and proxies send them.
    chunked_manifests: bool,
    /// The rate ranged blob responses are sent at.
    pace: Option<Pace>,
}

/// A rate limit on ranged blob responses, in bytes per second.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// Each response at this rate (a CDN that limits each connection).
    PerResponse(u64),
    /// All responses together at this rate (an upstream that limits only its total).
    Total(u64),
}

impl Pace {
    fn rate(self) -> u64 {
        match self {
            Pace::PerResponse(r) | Pace::Total(r) => r.max(1),
        }
    }
}

/// One request's fate while the upstream flaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flap {
    /// Answered normally.
    Ok,
    /// An OCI error with this status (429 carries `Retry-After`).
    Status(u16),
    /// The connection is reset (`SO_LINGER` 0) before any byte of the response.
    Reset,
    /// Headers, half the body, then a broken connection.
    CutBody,
    /// No response until the flapping stops (the request is held, not refused).
    StallHeaders,
    /// Headers and half the body, then nothing until the flapping stops.
    StallBody,
    /// Right length, wrong bytes.
    Garbage,
}

impl Flap {
    /// Every kind (a storm cycles through them in a shuffled order).
    pub const ALL: [Flap; 9] = [
        Flap::Ok,
        Flap::Status(500),
        Flap::Status(503),
        Flap::Status(429),
        Flap::Reset,
        Flap::CutBody,
        Flap::StallHeaders,
        Flap::StallBody,
        Flap::Garbage,
    ];
}

/// A storm: bursts of 1–3 requests with the same flap, the kinds in a shuffled order that repeats, so that the
/// first 27 requests ([`Flap::ALL`] × 3) see every kind.
struct Flapping {
    rng: StdRng,
    order: Vec<Flap>,
    next: usize,
    current: Flap,
    left: usize,
    /// Held requests, all released when the flapping stops.
    stalls: Vec<Arc<Gate>>,
}

impl Flapping {
    fn draw(&mut self) -> Flap {
        if self.left == 0 {
            if self.next == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.next = 0;
            }
            self.current = self.order[self.next];
            self.next += 1;
            self.left = self.rng.random_range(1..=3);
        }
        self.left -= 1;
        self.current
    }
}

#[derive(Default)]
struct Shared {
    base: String,
    cdn_base: String,
    blobs: Mutex<HashMap<String, Bytes>>,
    /// (repo, tag or digest) → (content type, body).
    manifests: Mutex<HashMap<(String, String), (String, Bytes)>>,
    faults: Mutex<Faults>,
    tokens: Mutex<HashSet<String>>,
    blob_gets: Mutex<HashMap<String, usize>>,
    blob_heads: Mutex<HashMap<String, usize>>,
    manifest_gets: AtomicUsize,
    manifest_heads: AtomicUsize,
    token_requests: AtomicUsize,
    challenges: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// `Range` header of every blob GET, per digest (`None`: no Range).
    blob_ranges: Mutex<HashMap<String, Vec<Option<String>>>>,
    /// Ranged blob responses being sent now, and the most at once.
    ranged_in_flight: AtomicUsize,
    ranged_in_flight_max: AtomicUsize,
    /// With [`Pace::Total`]: when the shared pace lets the next piece go.
    total_pace_next: Mutex<Option<Instant>>,
}

/// The running fake. Dropping it stops accepting connections.
pub struct FakeUpstream {
    /// The registry listener (`127.0.0.1:port`).
    pub addr: SocketAddr,
    /// The redirect target: another host (`127.0.0.2` when available) and port.
    pub cdn_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Vec<oneshot::Sender<()>>,
}

impl FakeUpstream {
    /// Binds both listeners on loopback ephemeral ports and spawns them on the current runtime.
    pub async fn start() -> FakeUpstream {
        let main = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = match TcpListener::bind("127.0.0.2:0").await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let (addr, cdn_addr) = (main.local_addr().unwrap(), cdn.local_addr().unwrap());
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            cdn_base: format!("http://{cdn_addr}"),
            ..Default::default()
        });
        let main_app = Router::new()
            .route("/token", get(token))
            .route("/v2/", get(|| async { "{}" }))
            .route("/v2/{*rest}", any(registry))
            .with_state(shared.clone());
        let cdn_app = Router::new().route("/cdn/{digest}", any(cdn_blob)).with_state(shared.clone());
        let mut stop = Vec::new();
        for (listener, app) in [(main, main_app), (cdn, cdn_app)] {
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            let app = app.into_make_service_with_connect_info::<Conn>();
            let serve = axum::serve(FlakyListener(listener), app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            tokio::spawn(async move { serve.await });
        }
        FakeUpstream { addr, cdn_addr, shared, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// Arguments that make wharf mirror this fake as its default registry [`REGISTRY`].
    pub fn wharf_args(&self) -> Vec<String> {
        let up = format!("{REGISTRY}={}", self.url());
        ["--upstream", &up, "--default-registry", REGISTRY].iter().map(|s| s.to_string()).collect()
    }

    /// Stores a blob and returns its digest.
    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = sha256_digest(&data);
        self.shared.blobs.lock().unwrap().insert(digest.clone(), data);
        digest
    }

    /// With bearer auth, hands anonymous clients tokens that read only `repos` (as Docker Hub does).
    pub fn set_public_repos(&self, repos: &[&str]) {
        self.faults().public_repos = Some(repos.iter().map(|r| r.to_string()).collect());
    }

    /// Stores `len` random bytes that only `repos` have; returns (digest, bytes).
    pub fn add_random_blob_in(&self, repos: &[&str], len: usize) -> (String, Bytes) {
        let (digest, data) = self.add_random_blob(len);
        self.faults().blob_repos.insert(digest.clone(), repos.iter().map(|r| r.to_string()).collect());
        (digest, data)
    }

    /// Stores `len` random bytes; returns (digest, bytes).
    pub fn add_random_blob(&self, len: usize) -> (String, Bytes) {
        let data = random_bytes(len);
        (self.add_blob(data.clone()), data)
    }

    /// Stores a manifest under `tag` (replacing the tag's previous target) and under its digest.
    pub fn put_manifest(&self, repo: &str, tag: &str, content_type: &str, body: impl Into<Bytes>) -> String {
        let body = body.into();
        let digest = sha256_digest(&body);
        let mut m = self.shared.manifests.lock().unwrap();
        for r in [tag, digest.as_str()] {
            m.insert((repo.to_string(), r.to_string()), (content_type.to_string(), body.clone()));
        }
        digest
    }

    /// Upstream GETs of `digest` on the registry host (redirect targets are counted in [`Self::requests`]).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.shared.blob_gets.lock().unwrap().get(digest).copied().unwrap_or(0)
    }
    /// Upstream HEADs of `digest`.
    pub fn blob_heads(&self, digest: &str) -> usize {
        self.shared.blob_heads.lock().unwrap().get(digest).copied().unwrap_or(0)
    }
    /// Manifest GETs (any repo, any reference), including refused ones.
    pub fn manifest_gets(&self) -> usize {
        self.shared.manifest_gets.load(SeqCst)
    }
    /// Manifest HEADs, including refused ones.
    pub fn manifest_heads(&self) -> usize {
        self.shared.manifest_heads.load(SeqCst)
    }
    /// Requests to the token endpoint.
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(SeqCst)
    }
    /// `401` challenges sent.
    pub fn challenges(&self) -> usize {
        self.shared.challenges.load(SeqCst)
    }
    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.shared.faults.lock().unwrap()
    }
    /// Drop the connection after `n` body bytes of `digest` (`None`: stop doing that).
    pub fn drop_after(&self, digest: &str, n: Option<usize>) {
        self.faults().drop_after.remove(digest);
        self.faults().drop_after.extend(n.map(|n| (digest.to_string(), n)));
    }
    /// Serve bytes of the right length but the wrong content for `digest`.
    pub fn wrong_bytes(&self, digest: &str, on: bool) {
        self.faults().wrong_bytes.remove(digest);
        self.faults().wrong_bytes.extend(on.then(|| digest.to_string()));
    }
    /// Answer every `/v2/` request with this status (429, 500, 503, …), or behave (`None`).
    pub fn fail_with(&self, status: Option<u16>) {
        self.faults().fail_with = status;
    }
    /// How `/v2/` requests must authenticate from now on.
    pub fn set_auth(&self, auth: Auth) {
        self.faults().auth = auth;
    }
    /// Answer blob GETs with `307` to the other listener.
    pub fn redirect_blobs(&self, on: bool) {
        self.faults().redirect_blobs = on;
    }
    /// Serve `Range` requests on blobs with 206 (`true`) or ignore them with 200 (`false`, the default).
    pub fn honor_ranges(&self, on: bool) {
        self.faults().honor_ranges = on;
    }

    /// Sends ranged blob responses at `pace` (`None`: as fast as possible).
    pub fn pace(&self, pace: Option<Pace>) {
        self.faults().pace = pace;
    }

    /// The most ranged blob responses that were being sent at once.
    pub fn ranged_in_flight_max(&self) -> usize {
        self.shared.ranged_in_flight_max.load(SeqCst)
    }

    /// Break the next `times` ranged responses of `digest` that cover absolute offset `at`.
    pub fn drop_range(&self, digest: &str, at: usize, times: usize) {
        self.faults().drop_range.insert(digest.to_string(), (at, times));
    }

    /// The `Range` header of every GET of `digest` so far, in order.
    pub fn blob_ranges(&self, digest: &str) -> Vec<Option<String>> {
        self.shared.blob_ranges.lock().unwrap().get(digest).cloned().unwrap_or_default()
    }

    /// Starts a storm of faults on every manifest and blob request (seeded: the same requests in the same
    /// order meet the same faults); [`Self::stop_flapping`] ends it.
    pub fn start_flapping(&self, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order = Flap::ALL.to_vec();
        order.shuffle(&mut rng);
        let storm = Flapping { rng, order, next: 0, current: Flap::Ok, left: 0, stalls: Vec::new() };
        self.faults().flapping = Some(storm);
    }

    /// Ends the storm: held requests continue (their clients may have given up) and new ones behave.
    pub fn stop_flapping(&self) {
        if let Some(storm) = self.faults().flapping.take() {
            storm.stalls.iter().for_each(|g| g.release());
        }
    }

    /// How many requests met each flap so far.
    pub fn flaps(&self) -> HashMap<Flap, usize> {
        self.faults().flaps.clone()
    }

    /// Install a gate on `digest` after `after` bytes.
    pub fn gate(&self, digest: &str, after: usize) -> Arc<Gate> {
        let gate = Arc::new(Gate { after, reached: watch::channel(false).0, released: watch::channel(false).0 });
        self.faults().gates.insert(digest.to_string(), gate.clone());
        gate
    }

    /// Holds every token response until [`Gate::release`]; [`Gate::wait_reached`] waits for the first one.
    pub fn gate_tokens(&self) -> Arc<Gate> {
        let gate = Arc::new(Gate { after: 0, reached: watch::channel(false).0, released: watch::channel(false).0 });
        self.faults().token_gate = Some(gate.clone());
        gate
    }

    /// Holds every manifest GET body longer than `after` bytes after `after` bytes (the headers are sent)
    /// until [`Gate::release`].
    pub fn gate_manifests(&self, after: usize) -> Arc<Gate> {
        let gate = Arc::new(Gate { after, reached: watch::channel(false).0, released: watch::channel(false).0 });
        self.faults().manifest_gate = Some(gate.clone());
        gate
    }

    /// Serve manifest GETs without `Content-Length` (`true`), or with it (`false`, the default).
    pub fn chunked_manifests(&self, on: bool) {
        self.faults().chunked_manifests = on;
    }

    /// Closes both listeners: new connections are refused (in-flight ones may finish).
    pub async fn stop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
        wait_until("fake upstream stops listening", || std::net::TcpStream::connect(self.addr).is_err()).await;
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
        // Unblock bodies parked on gates so their connections can end.
        for g in self.faults().gates.values() {
            g.release();
        }
        let held = {
            let mut f = self.faults();
            [f.token_gate.take(), f.manifest_gate.take()]
        };
        held.iter().flatten().for_each(|g| g.release());
        self.stop_flapping();
    }
}

fn record(s: &Shared, listener: &'static str, method: &Method, uri: &Uri, headers: &HeaderMap, status: u16) {
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("<binary>").to_string());
    let path = uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    s.seen.lock().unwrap().push(Seen { listener, method: method.to_string(), path, authorization, status });
}

fn oci_error(status: StatusCode, code: &str) -> Response {
    let body = serde_json::json!({"errors":[{"code": code, "message": code.to_lowercase(), "detail": null}]});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn token(State(s): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    s.token_requests.fetch_add(1, SeqCst);
    let gate = s.faults.lock().unwrap().token_gate.clone();
    if let Some(g) = gate {
        g.reached.send_replace(true);
        let _ = g.released.subscribe().wait_for(|r| *r).await;
    }
    let want = match s.faults.lock().unwrap().auth.clone() {
        Auth::Bearer(creds) => creds,
        _ => None,
    };
    let ok = want.is_none_or(|(u, p)| headers.get(header::AUTHORIZATION) == Some(&basic(&u, &p)));
    let anonymous = !headers.contains_key(header::AUTHORIZATION) && s.faults.lock().unwrap().public_repos.is_some();
    let resp = if ok || anonymous {
        let kind = if ok { "tok" } else { "anon" };
        let tok = format!("{kind}-{}", s.token_requests.load(SeqCst));
        s.tokens.lock().unwrap().insert(tok.clone());
        axum::Json(serde_json::json!({"token": tok, "access_token": tok, "expires_in": 300})).into_response()
    } else {
        oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    };
    record(&s, "main", &method, &uri, &headers, resp.status().as_u16());
    resp
}

/// `Basic base64(user:pass)` as a header value.
pub fn basic(user: &str, pass: &str) -> HeaderValue {
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    HeaderValue::from_str(&format!("Basic {enc}")).unwrap()
}

async fn registry(
    State(s): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let rest = uri.path().trim_start_matches("/v2/").to_string();
    let parsed = rest.rsplit_once('/').and_then(|(front, reference)| {
        let (repo, kind) = front.rsplit_once('/')?;
        Some((repo.to_string(), kind.to_string(), reference.to_string()))
    });
    let Some((repo, kind, reference)) = parsed else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let head = method == Method::HEAD;
    match (kind.as_str(), head) {
        ("manifests", false) => s.manifest_gets.fetch_add(1, SeqCst),
        ("manifests", true) => s.manifest_heads.fetch_add(1, SeqCst),
        ("blobs", false) => bump(&s.blob_gets, &reference),
        ("blobs", true) => bump(&s.blob_heads, &reference),
        _ => 0,
    };
    let flap = if matches!(kind.as_str(), "manifests" | "blobs") { next_flap(&s) } else { None };
    let resp = match flap {
        Some((Flap::Reset, _)) => {
            conn.reset();
            StatusCode::OK.into_response() // never reaches the wire
        }
        Some((Flap::Status(code), _)) => status_error(code),
        Some((Flap::StallHeaders, Some(gate))) => {
            let _ = gate.released.subscribe().wait_for(|r| *r).await;
            respond(&s, &headers, head, &repo, &kind, &reference, None)
        }
        Some((flap, gate)) => respond(&s, &headers, head, &repo, &kind, &reference, Some((flap, gate))),
        None => respond(&s, &headers, head, &repo, &kind, &reference, None),
    };
    record(&s, "main", &method, &uri, &headers, resp.status().as_u16());
    resp
}

/// Draws the next request's flap while a storm lasts; a stalling flap comes with its gate, registered under
/// the same lock so that stopping the storm releases it.
fn next_flap(s: &Shared) -> Option<(Flap, Option<Arc<Gate>>)> {
    let mut f = s.faults.lock().unwrap();
    let storm = f.flapping.as_mut()?;
    let flap = storm.draw();
    let gate = matches!(flap, Flap::StallHeaders | Flap::StallBody).then(|| {
        let gate = Arc::new(Gate { after: 0, reached: watch::channel(false).0, released: watch::channel(false).0 });
        storm.stalls.push(gate.clone());
        gate
    });
    *f.flaps.entry(flap).or_default() += 1;
    Some((flap, gate))
}

fn status_error(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap();
    let mut r = oci_error(status, if code == 429 { "TOOMANYREQUESTS" } else { "UNAVAILABLE" });
    if code == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// A body flap (`CutBody`, `StallBody`, `Garbage`) with the gate a stall waits on.
type BodyFlap = Option<(Flap, Option<Arc<Gate>>)>;

/// `data` as a stream with a body flap applied at its middle.
fn flapped_body(data: Bytes, flap: BodyFlap) -> Body {
    let half = data.len() / 2;
    match flap {
        Some((Flap::CutBody, _)) => Body::from_stream(stream::iter([
            Ok(data.slice(..half)),
            Err(std::io::Error::other("fake upstream: flapping cut the body")),
        ])),
        Some((Flap::StallBody, Some(gate))) => {
            let rest = data.slice(half..);
            let held = async move {
                let _ = gate.released.subscribe().wait_for(|r| *r).await;
                Ok::<_, std::io::Error>(rest)
            };
            Body::from_stream(stream::iter([Ok(data.slice(..half))]).chain(stream::once(held)))
        }
        Some((Flap::Garbage, _)) => Body::from(data.iter().map(|b| !b).collect::<Vec<u8>>()),
        _ => Body::from(data),
    }
}

fn bump(map: &Mutex<HashMap<String, usize>>, key: &str) -> usize {
    let mut m = map.lock().unwrap();
    let n = m.entry(key.to_string()).or_default();
    *n += 1;
    *n
}

fn respond(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    head: bool,
    repo: &str,
    kind: &str,
    reference: &str,
    flap: BodyFlap,
) -> Response {
    // A HEAD has no body to flap.
    let flap = flap.filter(|_| !head);
    let (auth, fail, redirect) = {
        let f = s.faults.lock().unwrap();
        (f.auth.clone(), f.fail_with, f.redirect_blobs)
    };
    let got = headers.get(header::AUTHORIZATION);
    let challenge = match auth {
        Auth::Anonymous => None,
        Auth::Bearer(_) => {
            let ok = got.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            let public = |repo: &str| s.faults.lock().unwrap().public_repos.as_ref().is_some_and(|p| p.contains(repo));
            let ok =
                ok.is_some_and(|t| s.tokens.lock().unwrap().contains(t) && (!t.starts_with("anon-") || public(repo)));
            (!ok).then(|| format!(r#"Bearer realm="{}/token",service="fake",scope="repository:{repo}:pull""#, s.base))
        }
        Auth::Basic(u, p) => (got != Some(&basic(&u, &p))).then(|| r#"Basic realm="fake""#.to_string()),
    };
    if let Some(challenge) = challenge {
        s.challenges.fetch_add(1, SeqCst);
        let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&challenge).unwrap());
        return r;
    }
    if let Some(code) = fail {
        return status_error(code);
    }
    match kind {
        "manifests" => {
            let found = s.manifests.lock().unwrap().get(&(repo.to_string(), reference.to_string())).cloned();
            let Some((ct, body)) = found else {
                return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            };
            let (gate, chunked) = {
                let f = s.faults.lock().unwrap();
                (f.manifest_gate.clone(), f.chunked_manifests)
            };
            if !head && (gate.is_some() || chunked) {
                let mut r = ([(header::CONTENT_TYPE, ct), (DIGEST_HEADER, sha256_digest(&body))], Body::empty())
                    .into_response();
                if !chunked {
                    r.headers_mut().insert(header::CONTENT_LENGTH, body.len().into());
                }
                *r.body_mut() = held_manifest(body, gate);
                return r;
            }
            let hdrs = [
                (header::CONTENT_TYPE, ct),
                (header::CONTENT_LENGTH, body.len().to_string()),
                (DIGEST_HEADER, sha256_digest(&body)),
            ];
            (hdrs, if head { Body::empty() } else { flapped_body(body, flap) }).into_response()
        }
        "blobs" if s.faults.lock().unwrap().blob_repos.get(reference).is_some_and(|r| !r.contains(repo)) => {
            oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
        }
        "blobs" if redirect && !head => {
            let to = format!("{}/cdn/{reference}", s.cdn_base);
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
        }
        "blobs" => {
            let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
            if !head {
                s.blob_ranges.lock().unwrap().entry(reference.to_string()).or_default().push(range.clone());
            }
            if s.faults.lock().unwrap().honor_ranges
                && let Some(r) = range.as_deref().and_then(parse_range)
            {
                return ranged_blob_response(s, reference, r, flap);
            }
            blob_response(s, reference, head, flap)
        }
        _ => oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
    }
}

async fn cdn_blob(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let resp = blob_response(&s, &digest, method == Method::HEAD, None);
    record(&s, "cdn", &method, &uri, &headers, resp.status().as_u16());
    resp
}

enum Step {
    Data(Bytes),
    Hold(Arc<Gate>),
    Fail,
}

/// The blob body, streamed in chunks, with the drop / wrong-bytes / gate faults applied.
fn blob_response(s: &Shared, digest: &str, head: bool, flap: BodyFlap) -> Response {
    let Some(data) = s.blobs.lock().unwrap().get(digest).cloned() else {
        return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    };
    let hdrs = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, data.len().to_string()),
        (DIGEST_HEADER, digest.to_string()),
    ];
    if head {
        return (hdrs, Body::empty()).into_response();
    }
    let (mut drop_at, mut wrong, mut gate) = {
        let f = s.faults.lock().unwrap();
        (f.drop_after.get(digest).copied(), f.wrong_bytes.contains(digest), f.gates.get(digest).cloned())
    };
    match flap {
        Some((Flap::CutBody, _)) => drop_at = Some(drop_at.unwrap_or(usize::MAX).min(data.len() / 2)),
        Some((Flap::Garbage, _)) => wrong = true,
        Some((Flap::StallBody, Some(g))) => {
            gate =
                Some(Arc::new(Gate { after: data.len() / 2, reached: g.reached.clone(), released: g.released.clone() }))
        }
        _ => {}
    }
    let data = if wrong { data.iter().map(|b| !b).collect::<Vec<u8>>().into() } else { data };
    let len = data.len();
    let end = drop_at.map_or(len, |n| n.min(len));
    let mut steps = Vec::new();
    let mut a = 0;
    loop {
        if let Some(g) = gate.as_ref().filter(|g| g.after == a) {
            steps.push(Step::Hold(g.clone()));
        }
        if a >= end {
            break;
        }
        let mut b = (a + CHUNK).min(end);
        if let Some(g) = gate.as_ref().filter(|g| a < g.after && g.after < b) {
            b = g.after;
        }
        steps.push(Step::Data(data.slice(a..b)));
        a = b;
    }
    if end < len {
        steps.push(Step::Fail);
    }
    let body = stream::iter(steps)
        .then(|step| async move {
            match step {
                Step::Data(d) => Some(Ok(d)),
                Step::Hold(g) => {
                    g.reached.send_replace(true);
                    let _ = g.released.subscribe().wait_for(|r| *r).await;
                    None
                }
                Step::Fail => {
                    // Return Pending a few times first so hyper flushes the headers and bytes sent so far.
                    for _ in 0..4 {
                        tokio::task::yield_now().await;
                    }
                    Some(Err(std::io::Error::other("fake upstream: dropping the connection")))
                }
            }
        })
        .filter_map(futures_util::future::ready);
    (hdrs, Body::from_stream(body)).into_response()
}

/// A manifest body, streamed, held at the gate's offset until the gate is released.
fn held_manifest(body: Bytes, gate: Option<Arc<Gate>>) -> Body {
    // A gate past the end holds nothing: the body is complete before it.
    let gate = gate.filter(|g| g.after < body.len());
    let at = gate.as_ref().map_or(body.len(), |g| g.after);
    let (first, rest) = (body.slice(..at), body.slice(at..));
    let held = async move {
        if let Some(g) = gate {
            g.reached.send_replace(true);
            let _ = g.released.subscribe().wait_for(|r| *r).await;
        }
        Ok::<_, std::io::Error>(rest)
    };
    // Empty chunks are left out: they could end a chunked body early.
    let parts = stream::iter([Ok(first)]).chain(stream::once(held));
    Body::from_stream(parts.filter(|r| futures_util::future::ready(r.as_ref().map_or(true, |b| !b.is_empty()))))
}

/// `bytes=a-b` or `bytes=a-` → (a, Some(b) | None).
fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, if b.is_empty() { None } else { Some(b.parse().ok()?) }))
}

/// A 206 for `range` of the blob, with the wrong-bytes and drop faults applied.
fn ranged_blob_response(
    s: &Arc<Shared>,
    digest: &str,
    (first, last): (usize, Option<usize>),
    flap: BodyFlap,
) -> Response {
    let Some(data) = s.blobs.lock().unwrap().get(digest).cloned() else {
        return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    };
    let last = last.unwrap_or(usize::MAX).min(data.len().saturating_sub(1));
    if first > last {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let (wrong, drop_at, pace) = {
        let mut f = s.faults.lock().unwrap();
        let mut drop_at = None;
        if let Some((at, times)) = f.drop_range.get_mut(digest)
            && *times > 0
            && (first..=last).contains(at)
        {
            *times -= 1;
            drop_at = Some(*at);
        }
        (f.wrong_bytes.contains(digest), drop_at, f.pace)
    };
    let mut part = data.slice(first..=last);
    if wrong {
        part = part.iter().map(|b| !b).collect::<Vec<u8>>().into();
    }
    let hdrs = [
        (header::CONTENT_TYPE, "application/octet-stream".to_string()),
        (header::CONTENT_LENGTH, part.len().to_string()),
        (header::CONTENT_RANGE, format!("bytes {first}-{last}/{}", data.len())),
    ];
    let cut = drop_at.map(|at| at - first);
    let body = match cut {
        Some(n) => Body::from_stream(stream::iter([
            Ok(part.slice(..n)),
            Err(std::io::Error::other("fake upstream: dropping a ranged response")),
        ])),
        None if flap.is_some() => flapped_body(part, flap),
        None if pace.is_some() => paced_body(s.clone(), part, pace.unwrap()),
        None => Body::from_stream(stream::iter(
            part.chunks(CHUNK).map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c))).collect::<Vec<_>>(),
        )),
    };
    (StatusCode::PARTIAL_CONTENT, hdrs, body).into_response()
}

/// Counts a ranged response in flight until its body is dropped (sent or abandoned).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(s: Arc<Shared>) -> InFlight {
        let now = s.ranged_in_flight.fetch_add(1, SeqCst) + 1;
        s.ranged_in_flight_max.fetch_max(now, SeqCst);
        InFlight(s)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.ranged_in_flight.fetch_sub(1, SeqCst);
    }
}

/// `part` sent in [`CHUNK`] pieces, each when `pace` lets it go.
fn paced_body(s: Arc<Shared>, part: Bytes, pace: Pace) -> Body {
    let state = (part, InFlight::new(s), Instant::now());
    let pieces = stream::unfold(state, move |(mut rest, in_flight, own_next)| async move {
        if rest.is_empty() {
            return None;
        }
        let piece = rest.split_to(rest.len().min(CHUNK));
        let cost = Duration::from_secs_f64(piece.len() as f64 / pace.rate() as f64);
        // A token bucket with 50 ms of burst: time a slow reader lost is made up, so one response alone
        // reaches the full rate (a bucket without burst would hold it under the rate and reward a second).
        let earliest = Instant::now() - Duration::from_millis(50);
        let at = match pace {
            Pace::PerResponse(_) => own_next.max(earliest) + cost,
            Pace::Total(_) => {
                let mut next = in_flight.0.total_pace_next.lock().unwrap();
                let at = next.unwrap_or(earliest).max(earliest) + cost;
                *next = Some(at);
                at
            }
        };
        tokio::time::sleep_until(at.into()).await;
        Some((Ok::<_, std::io::Error>(piece), (rest, in_flight, at)))
    });
    Body::from_stream(pieces)
}

/// The fake's listener: a TCP listener whose connections a handler can reset (see [`Conn`]).
struct FlakyListener(TcpListener);

/// Per-connection info a handler gets: lets it reset its own connection before the response goes out.
#[derive(Clone, Debug)]
struct Conn(Arc<AtomicBool>);

impl Conn {
    fn reset(&self) {
        self.0.store(true, SeqCst);
    }
}

/// A connection that fails every write once reset, and closes with an RST (`SO_LINGER` 0) instead of a FIN.
struct FlakyIo {
    tcp: TcpStream,
    reset: Arc<AtomicBool>,
}

impl FlakyIo {
    fn check(&self) -> std::io::Result<()> {
        if !self.reset.load(SeqCst) {
            return Ok(());
        }
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket descriptor and a properly sized option value. Zero linger on a non-blocking
        // socket does not block at close; it only turns the FIN into an RST.
        unsafe {
            libc::setsockopt(
                self.tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        Err(std::io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for FlakyIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlakyIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Listener for FlakyListener {
    type Io = FlakyIo;
    type Addr = Conn;

    async fn accept(&mut self) -> (FlakyIo, Conn) {
        loop {
            match self.0.accept().await {
                Ok((tcp, _)) => {
                    let reset = Arc::new(AtomicBool::new(false));
                    return (FlakyIo { tcp, reset: reset.clone() }, Conn(reset));
                }
                // EMFILE and friends: wait a little rather than spin, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Conn> {
        self.0.local_addr().map(|_| Conn(Arc::default()))
    }
}

impl Connected<IncomingStream<'_, FlakyListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, FlakyListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::fill(&mut v[..]);
    v.into()
}

/// Where wharf commits a blob: `DATA/blobs/sha256/<2 hex>/<hex>`.
pub fn blob_path(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data_dir.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Polls `cond` every 10 ms until it holds; panics after 30 s naming `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client for talking to wharf: no proxies, no redirects, a generous overall timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// What a GET through wharf produced.
#[derive(Debug)]
pub enum Outcome {
    /// Headers and the whole body arrived cleanly.
    Complete(u16, HeaderMap, Bytes),
    /// Headers arrived, then the body broke (reset, truncated): the correct way to report a failed fill.
    Broken(u16, String),
    /// No response at all.
    Failed(String),
}

/// GETs `url` with optional extra headers and reads the whole body.
pub async fn fetch(client: &reqwest::Client, url: &str, extra: &[(&str, &str)]) -> Outcome {
    spawn_fetch(client, url, extra).0.await.unwrap()
}

/// [`fetch`] in a task; the receiver yields the status and headers as soon as they arrive.
pub fn spawn_fetch(
    client: &reqwest::Client,
    url: &str,
    extra: &[(&str, &str)],
) -> (JoinHandle<Outcome>, oneshot::Receiver<(u16, HeaderMap)>) {
    let (client, url, (tx, rx)) = (client.clone(), url.to_string(), oneshot::channel());
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let task = tokio::spawn(async move {
        let mut req = client.get(&url);
        for (k, v) in &extra {
            req = req.header(k, v);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("{e:?}")),
        };
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        let _ = tx.send((status, headers.clone()));
        match resp.bytes().await {
            Ok(b) => Outcome::Complete(status, headers, b),
            Err(e) => Outcome::Broken(status, format!("{e:?}")),
        }
    });
    (task, rx)
}

/// Waits (at most 30 s) for the response headers of a [`spawn_fetch`]; panics naming `what` otherwise.
pub async fn headers_of(what: &str, rx: oneshot::Receiver<(u16, HeaderMap)>) -> (u16, HeaderMap) {
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(h)) => h,
        Ok(Err(_)) => panic!("{what}: the request failed before any response headers"),
        Err(_) => panic!("{what}: no response headers within 30 s"),
    }
}

/// GETs `url` and demands a clean `200` whose body equals `want`.
pub async fn get_ok(client: &reqwest::Client, url: &str, want: &[u8]) -> HeaderMap {
    match fetch(client, url, &[]).await {
        Outcome::Complete(200, h, b) => {
            assert_eq!(b.len(), want.len(), "GET {url}: body length");
            assert!(b == want, "GET {url}: body differs from the upstream blob");
            h
        }
        other => panic!("GET {url}: expected 200 with the blob, got {other:?}"),
    }
}
