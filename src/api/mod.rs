//! HTTP: every route, the OCI error model and the one-line request log. The only module that knows URLs.
//! No compression layer: clients rely on identity encoding, since digests and ranges are over the stored bytes.

mod blobs;
pub mod error;
mod manifests;
mod ops;
mod passthrough;
pub mod path;
pub mod peer;
pub mod range;

use crate::access::{Denied, Target};
use crate::cache::Outcome;
use crate::cache::reader::Delivery;
use crate::config::PrivateAnswer;
use crate::metrics::RequestLabels;
use crate::oci::RepoName;
use crate::state::AppState;
use crate::upstream::RegistryClient;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use error::Subject;
use error::{Error, ErrorNote, OciCode};
use http::{HeaderMap, HeaderValue, Method, header};
use path::Endpoint;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which upstream served a request and how, attached to responses for the request log.
#[derive(Debug, Clone)]
pub struct RequestNote {
    /// Registry name.
    pub registry: String,
    /// Cache outcome.
    pub outcome: Outcome,
    /// Where the bytes came from: `disk`, `fill` (another request's fill in progress), `peer` or `upstream`.
    pub source: &'static str,
}

impl RequestNote {
    /// A note whose source follows from the outcome alone (a fill started here is an upstream fill).
    pub fn new(registry: String, outcome: Outcome) -> RequestNote {
        let source = match outcome {
            Outcome::Hit | Outcome::Revalidated | Outcome::Stale => "disk",
            Outcome::Coalesced => "fill",
            Outcome::Miss | Outcome::Passthrough | Outcome::Uncached => "upstream",
        };
        RequestNote { registry, outcome, source }
    }
}

/// A request routed to an upstream: the state, the registry client and the upstream repository name.
pub struct Routed {
    /// Shared state.
    pub state: AppState,
    /// The registry.
    pub client: Arc<RegistryClient>,
    /// The repository as the upstream names it.
    pub repo: RepoName,
    /// A peer's request (peer API): served from this node or its upstream, never from another peer.
    pub from_peer: bool,
}

/// The application: `/v2/` API, health endpoints, request log and API-version header.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2/", any(base))
        .route("/v2", any(base))
        .route("/v2/{*rest}", any(dispatch))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { Error::new(OciCode::NameUnknown, "unknown endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

async fn base(State(state): State<AppState>, method: Method, headers: HeaderMap) -> Response {
    if !matches!(method, Method::GET | Method::HEAD) {
        return Error::new(OciCode::Unsupported, "wharf is a pull-only mirror").into_response();
    }
    if !headers.contains_key(header::AUTHORIZATION) && state.access.is_active(&state.upstreams) {
        // Docker and podman learn here whether to send credentials; anonymous clients carry on as with
        // Docker Hub, whose `/v2/` also answers 401.
        return Error::new(OciCode::Unauthorized, "credentials are needed for private content").into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    // Requests carry no body: the head is taken apart rather than copied.
    let (http::request::Parts { method, uri, headers, extensions, .. }, _body) = req.into_parts();
    let delivery = extensions.get::<Delivery>().copied().unwrap_or_default();
    let rest = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let ns = uri.query().and_then(ns_param);
    let result = async {
        let endpoint = path::parse(rest);
        if !matches!(method, Method::GET | Method::HEAD) || matches!(endpoint, Ok(Endpoint::Upload)) {
            return Err(Error::new(OciCode::Unsupported, "wharf is a pull-only mirror"));
        }
        let endpoint = endpoint?;
        let (name, target, subject) = match &endpoint {
            Endpoint::Blob(name, digest) => (*name, Target::Blob(digest), Subject::Blob),
            Endpoint::Manifest(name, reference) => (*name, Target::Manifest(reference), Subject::Manifest),
            Endpoint::TagsList(name) | Endpoint::Referrers(name, _) => (*name, Target::Repository, Subject::Repository),
            Endpoint::Upload => unreachable!("refused above"),
        };
        let (client, repo) = state.upstreams.route(ns.as_deref(), name)?;
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        state
            .access
            .check(&state.cache, &client, &repo, target, authorization)
            .await
            .map_err(|e| denial(e, subject))?;
        let routed = Routed { state: state.clone(), client, repo, from_peer: false };
        let head = method == Method::HEAD;
        match endpoint {
            Endpoint::Blob(_, digest) if head => blobs::head(routed, digest).await,
            Endpoint::Blob(_, digest) => blobs::get(routed, digest, &headers, delivery).await,
            Endpoint::Manifest(_, reference) => manifests::get_or_head(routed, reference, &headers, !head).await,
            Endpoint::TagsList(_) => passthrough::forward(routed, "tags/list", uri.query()).await,
            Endpoint::Referrers(_, digest) => {
                passthrough::forward(routed, &format!("referrers/{digest}"), uri.query()).await
            }
            Endpoint::Upload => unreachable!("refused above"),
        }
    };
    let mut resp = within_deadline(&state, result).await;
    if let Some(ns) = ns.and_then(|ns| HeaderValue::from_str(&ns).ok()) {
        // distribution-spec "Registry Proxying": echo the namespace the request was scoped to.
        resp.headers_mut().insert("oci-namespace", ns);
    }
    resp
}

/// The answer of `work`, or a 503 past `server.request_timeout`: a stalled upstream (or peer) must not hold a
/// client forever, who then moves on to its next host. A fill that was started goes on in the background.
async fn within_deadline(state: &AppState, work: impl Future<Output = Result<Response, Error>>) -> Response {
    let deadline = Duration::from_secs(state.config.server.request_timeout.max(1));
    let result = tokio::time::timeout(deadline, work).await.unwrap_or_else(|_| {
        Err(Error::new(OciCode::Unavailable, format!("no answer from the upstream within {}s", deadline.as_secs())))
    });
    result.unwrap_or_else(IntoResponse::into_response)
}

/// The answer to a refused request: hidden content looks like content that does not exist.
fn denial(e: Denied, subject: Subject) -> Error {
    let not_found = |detail: &str| {
        let code = match subject {
            Subject::Blob => OciCode::BlobUnknown,
            Subject::Manifest => OciCode::ManifestUnknown,
            Subject::Repository => OciCode::NameUnknown,
        };
        Error::new(code, detail)
    };
    match e {
        Denied::Private(PrivateAnswer::Deny) => Error::new(OciCode::Unauthorized, e.to_string()),
        Denied::Private(PrivateAnswer::Hide) => not_found("unknown to this registry"),
        Denied::NotReferenced => not_found("not referenced by this repository"),
        Denied::Upstream(u) => Error::upstream(&u, subject),
        Denied::Cache(c) => Error::cache(&c, subject),
    }
}

/// containerd's `ns` query parameter (the registry a request is for), percent-decoded; the first one wins.
pub fn ns_param(query: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "ns").map(|(_, v)| v.into_owned())
}

/// The metrics label for a path: a handful of fixed values, never the raw path.
fn route_of(path: &str) -> &'static str {
    match path.strip_prefix("/v2/").map(path::parse) {
        None if path == "/v2" => "base",
        None if matches!(path, "/healthz" | "/readyz" | "/metrics") => "ops",
        None => "other",
        Some(Ok(Endpoint::Manifest(..))) => "manifest",
        Some(Ok(Endpoint::Blob(..))) => "blob",
        Some(Ok(Endpoint::TagsList(..))) => "tags",
        Some(Ok(Endpoint::Referrers(..))) => "referrers",
        Some(Ok(Endpoint::Upload)) => "upload",
        Some(Err(_)) if path == "/v2/" => "base",
        Some(Err(_)) => "other",
    }
}

/// One line per request, request and cache metrics, and the API-version header on every response.
async fn log_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let target = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let route = route_of(req.uri().path());
    let mut resp = next.run(req).await;
    let labels = RequestLabels { route, method: method.to_string(), status: resp.status().as_u16() };
    state.metrics.requests.get_or_create(&labels).inc();
    if let Some(note) = resp.extensions().get::<RequestNote>()
        && matches!(route, "blob" | "manifest")
    {
        state.metrics.cache_outcome(route, note.outcome.as_str());
        if note.outcome == Outcome::Stale {
            state.metrics.stale_served.inc();
        }
    }
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    let note = resp.extensions().get::<RequestNote>();
    let bytes = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-");
    let error = resp.extensions().get::<ErrorNote>().map(|n| n.0.as_str()).unwrap_or("");
    tracing::info!(
        target: "wharf::request",
        %method,
        path = %target,
        status = resp.status().as_u16(),
        upstream = note.map(|n| n.registry.as_str()).unwrap_or("-"),
        cache = note.map(|n| n.outcome.as_str()).unwrap_or("-"),
        source = note.map(|n| n.source).unwrap_or("-"),
        bytes,
        ms = start.elapsed().as_millis() as u64,
        error,
        "request"
    );
    resp
}
