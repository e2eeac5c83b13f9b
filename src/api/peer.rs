//! The peer API: what the other wharf instances of the cluster ask this one, on a listener of its own.
//! Every request is signed (see [`crate::cluster::auth`]) and checked before any other work; a signed
//! request comes from an edge that authorized its own client, so no client access check runs here.
//! Content is served from disk, from this node's fill, or from the upstream, never from another peer.

use super::error::{Error, OciCode};
use super::path::{self, Endpoint};
use super::{RequestNote, Routed, blobs, manifests, ns_param, within_deadline};
use crate::cache::reader::Delivery;
use crate::cluster::OUTCOME_HEADER;
use crate::cluster::auth::{AUTH_HEADER, PEER_HEADER};
use crate::oci::Digest;
use crate::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use futures_util::TryStreamExt;
use http::{HeaderValue, Method};
use std::time::Instant;

/// Where a peer's answer came from, for the asking node's logs and for tests.
pub const SOURCE_HEADER: &str = "x-wharf-source";

/// The peer API. `/healthz` answers unsigned (for probes); everything else needs a signature.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2/{*rest}", any(dispatch))
        .route("/_wharf/fill/{digest}", get(fill_status))
        .fallback(|| async { Error::new(OciCode::NameUnknown, "unknown peer endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), verify))
        .route("/healthz", get(super::ops::healthz))
        .with_state(state)
}

/// 401 for any request without a valid signature, before anything else happens.
async fn verify(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cluster) = state.cache.cluster() else {
        return Error::new(OciCode::Unsupported, "the cluster tier is off").into_response();
    };
    let refused = {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let checked = cluster.verify(req.method().as_str(), target, header(PEER_HEADER), header(AUTH_HEADER));
        checked.err().map(|e| {
            let sender = header(PEER_HEADER).unwrap_or("-");
            tracing::warn!(target: "wharf::peer", method = %req.method(), path = target, sender, error = %e, "peer request refused");
            e.to_string()
        })
    };
    match refused {
        Some(why) => Error::new(OciCode::Unauthorized, why).into_response(),
        None => next.run(req).await,
    }
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let start = Instant::now();
    let (method, uri, headers) = (req.method().clone(), req.uri().clone(), req.headers().clone());
    let delivery = req.extensions().get::<Delivery>().copied().unwrap_or_default();
    let sender = headers.get(PEER_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let rest = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let ns = uri.query().and_then(ns_param);
    let result = async {
        if !matches!(method, Method::GET | Method::HEAD) {
            return Err(Error::new(OciCode::Unsupported, "the peer API is read-only"));
        }
        let endpoint = path::parse(rest)?;
        let name = match &endpoint {
            Endpoint::Blob(name, _) | Endpoint::Manifest(name, _) => *name,
            _ => return Err(Error::new(OciCode::Unsupported, "peers ask for blobs and manifests only")),
        };
        let (client, repo) = state.upstreams.route(ns.as_deref(), name)?;
        let routed = Routed { state: state.clone(), client, repo, from_peer: true };
        match endpoint {
            Endpoint::Blob(_, digest) if method == Method::HEAD => blobs::head(routed, digest).await,
            Endpoint::Blob(_, digest) => blobs::get(routed, digest, &headers, delivery).await,
            Endpoint::Manifest(_, reference) => {
                manifests::get_or_head(routed, reference, &headers, method == Method::GET).await
            }
            _ => unreachable!("refused above"),
        }
    };
    let mut resp = within_deadline(&state, result).await;
    let note = resp.extensions().get::<RequestNote>();
    let (source, outcome) = note.map_or(("-", "-"), |n| (n.source, n.outcome.as_str()));
    resp.headers_mut().insert(SOURCE_HEADER, HeaderValue::from_static(source));
    // A stale manifest (this node's upstream failed) must not look freshly checked on the asking node.
    resp.headers_mut().insert(OUTCOME_HEADER, HeaderValue::from_static(outcome));
    tracing::info!(
        target: "wharf::peer",
        %method,
        path = %uri,
        status = resp.status().as_u16(),
        peer = %sender,
        source,
        range = headers.get(http::header::RANGE).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        ms = start.elapsed().as_millis() as u64,
        "peer request"
    );
    if let Some(cluster) = state.cache.cluster().cloned().filter(|_| rest.contains("/blobs/")) {
        let (parts, body) = resp.into_parts();
        let body = body.into_data_stream().inspect_ok(move |chunk| cluster.count_bytes("out", chunk.len() as u64));
        resp = Response::from_parts(parts, Body::from_stream(body));
    }
    resp
}

/// `GET /_wharf/fill/<digest>`: how this node's fill of a blob is going (a peer streaming from it checks
/// this when the bytes stop).
async fn fill_status(State(state): State<AppState>, Path(digest): Path<String>) -> Response {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return Error::from(e).into_response(),
    };
    match state.cache.fill_status(&digest).await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => Error::cache(&e, super::error::Subject::Blob).into_response(),
    }
}
