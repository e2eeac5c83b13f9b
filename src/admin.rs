//! The admin API: a separate listener (`admin.listen`, off when empty) with an optional bearer token
//! (`admin.token`). JSON in, JSON out. This module owns the routes and their JSON shapes; the work is done by
//! the cache (usage, pins, eviction, GC) and by [`crate::warm`] (prefetch).
//!
//! | route | what |
//! |---|---|
//! | `GET /repositories` | cached repositories and the tags wharf resolved for them |
//! | `GET /usage` | disk usage and bounds |
//! | `GET /pins` | pinned digests by warm-list image, and what the node's runtime holds of `into_runtime` images |
//! | `DELETE /blobs/{digest}` | evict one blob (or manifest): 200, 409 pinned or in use, 404 not cached |
//! | `DELETE /images/{image}` | evict what a cached image references (resolved from the cache only) |
//! | `POST /prefetch` | `{"images": [...], "platforms": [...]}`: `202` and a job that pulls them into the cache |
//! | `GET /prefetch/{id}` | the job's per-image progress ([`jobs`]) |
//! | `GET /prefetch` | every job still known |
//! | `POST /gc` | one eviction pass now |

pub mod jobs;

use crate::cache::EvictRefusal;
use crate::oci::manifest::References;
use crate::oci::{Digest, Reference};
use crate::state::AppState;
use crate::warm;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use sha2::Digest as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The admin router. With a non-empty `token`, every request needs `Authorization: Bearer <token>`. Prefetch
/// jobs run on `tasks` and stop when `stop` is cancelled; `in_runtime` is the warm list's runtime board.
pub fn router(
    state: AppState,
    in_runtime: Arc<warm::runtime::Board>,
    tasks: TaskTracker,
    stop: CancellationToken,
) -> Router {
    let token: Arc<str> = state.config.admin.token.as_str().into();
    let jobs = jobs::Jobs::new(tasks, stop);
    Router::new()
        .route("/repositories", get(repositories))
        .route("/usage", get(usage))
        .route("/pins", get(pins))
        .route("/blobs/{digest}", delete(delete_blob))
        .route("/images/{*image}", delete(delete_image))
        .route("/prefetch", post(prefetch).get(prefetch_jobs))
        .route("/prefetch/{id}", get(prefetch_job))
        .route("/gc", post(gc))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin endpoint") })
        .layer(Extension(jobs))
        .layer(Extension(in_runtime))
        .layer(middleware::from_fn_with_state(token, authorize))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Binds `admin.listen` when set (and logs the address); `None` when the admin API is off.
pub async fn bind(state: &AppState) -> std::io::Result<Option<TcpListener>> {
    let listen = state.config.admin.listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = listen.parse().map_err(|_| std::io::Error::other(format!("admin.listen {listen:?}")))?;
    let listener = TcpListener::bind(addr).await?;
    let auth = if state.config.admin.token.is_empty() { "none" } else { "bearer token" };
    tracing::info!(auth, "admin API on http://{}", listener.local_addr()?);
    Ok(Some(listener))
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// True when `headers` carry `Bearer <token>`. Both sides are hashed first, so the comparison takes the same
/// time whatever the given value's length or how much of it matches.
fn token_matches(headers: &HeaderMap, token: &str) -> bool {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let given = match given.split_once(' ') {
        Some((scheme, value)) if scheme.eq_ignore_ascii_case("bearer") => value.trim(),
        _ => "",
    };
    let (a, b) = (sha2::Sha256::digest(given.as_bytes()), sha2::Sha256::digest(token.as_bytes()));
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn authorize(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    if token.is_empty() || token_matches(req.headers(), &token) {
        return next.run(req).await;
    }
    let mut resp = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"wharf-admin\""));
    resp
}

async fn log_request(req: Request, next: Next) -> Response {
    let (start, method, path) = (Instant::now(), req.method().clone(), req.uri().path().to_owned());
    let resp = next.run(req).await;
    let (status, ms) = (resp.status().as_u16(), start.elapsed().as_millis() as u64);
    tracing::info!(target: "wharf::admin", %method, path, status, ms, "admin request");
    resp
}

/// Runs blocking cache work on the blocking pool; errors become 500s with their causes.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::cache::Error> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e))),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e))),
    }
}

async fn repositories(State(state): State<AppState>) -> Response {
    let cache = state.cache.clone();
    match blocking(move || cache.repositories()).await {
        Ok(repos) => Json(json!({ "repositories": repos })).into_response(),
        Err(resp) => resp,
    }
}

async fn usage(State(state): State<AppState>) -> Response {
    let cache = state.cache.clone();
    match blocking(move || Ok(cache.usage())).await {
        Ok(usage) => Json(usage).into_response(),
        Err(resp) => resp,
    }
}

async fn pins(State(state): State<AppState>, Extension(board): Extension<Arc<warm::runtime::Board>>) -> Response {
    let cache = state.cache.clone();
    match blocking(move || cache.pins()).await {
        Ok(pins) => Json(json!({ "pins": pins, "runtime": board.snapshot() })).into_response(),
        Err(resp) => resp,
    }
}

/// The JSON (and status) for one eviction.
fn evicted(digest: &Digest, result: Result<u64, EvictRefusal>) -> (StatusCode, Value) {
    match result {
        Ok(bytes) => (StatusCode::OK, json!({ "digest": digest, "evicted_bytes": bytes })),
        Err(refusal) => {
            let status = if refusal == EvictRefusal::NotCached { StatusCode::NOT_FOUND } else { StatusCode::CONFLICT };
            (status, json!({ "digest": digest, "error": refusal }))
        }
    }
}

async fn delete_blob(State(state): State<AppState>, Path(digest): Path<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return error(StatusCode::BAD_REQUEST, format!("{digest:?} is not a digest"));
    };
    match state.cache.evict(&digest).await {
        Ok(result) => {
            let (status, body) = evicted(&digest, result);
            (status, Json(body)).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e)),
    }
}

/// Manifests (top first) and blobs a cached image references, read from the cache alone.
fn cached_image(store: &crate::cache::BlobStore, roots: Vec<Digest>) -> std::io::Result<(Vec<Digest>, Vec<Digest>)> {
    let (mut manifests, mut blobs) = (Vec::new(), Vec::new());
    let mut todo = roots;
    todo.reverse();
    while let Some(digest) = todo.pop() {
        if manifests.contains(&digest) {
            continue;
        }
        let Some((_, bytes)) = store.read_manifest(&digest)? else { continue };
        manifests.push(digest);
        let Some(refs) = References::parse(&bytes) else { continue };
        todo.extend(refs.manifests.iter().rev().map(|m| m.digest.clone()));
        for b in refs.blobs() {
            if !blobs.contains(&b.digest) {
                blobs.push(b.digest.clone());
            }
        }
    }
    Ok((manifests, blobs))
}

async fn delete_image(State(state): State<AppState>, Path(image): Path<String>) -> Response {
    let target = match warm::target(&state.upstreams, &image) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let roots = match &target.reference {
        Reference::Digest(d) => vec![d.clone()],
        Reference::Tag(tag) => match state.cache.cached_tag(&target.client.name, &target.repo, tag) {
            Ok(found) => found,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e)),
        },
    };
    let store = state.cache.store().clone();
    let found = blocking(move || Ok(cached_image(&store, roots)?)).await;
    let (manifests, blobs) = match found {
        Ok(found) => found,
        Err(resp) => return resp,
    };
    if manifests.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("{image} is not cached"));
    }
    let (mut done, mut refused, mut bytes) = (Vec::new(), Vec::new(), 0);
    // Blobs first, then platform manifests, then the index: an interrupted pass leaves a walkable image.
    for digest in blobs.iter().chain(manifests.iter().rev()) {
        match state.cache.evict(digest).await {
            Ok(Ok(n)) => {
                bytes += n;
                done.push(digest.clone());
            }
            Ok(Err(EvictRefusal::NotCached)) => {}
            Ok(Err(refusal)) => refused.push(json!({ "digest": digest, "error": refusal })),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e)),
        }
    }
    tracing::info!(%image, evicted = done.len(), refused = refused.len(), bytes, "admin: image evicted");
    let status = if done.is_empty() && !refused.is_empty() { StatusCode::CONFLICT } else { StatusCode::OK };
    let body = json!({ "image": image, "evicted": done, "evicted_bytes": bytes, "refused": refused });
    (status, Json(body)).into_response()
}

/// `POST /prefetch` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchRequest {
    images: Vec<String>,
    #[serde(default)]
    platforms: Vec<String>,
}

/// Checks the request, then starts a job and answers `202` with it at once: pulling can outlast any client's
/// patience, and the job runs on whether or not the client stays.
async fn prefetch(
    State(state): State<AppState>,
    Extension(jobs): Extension<Arc<jobs::Jobs>>,
    body: Result<Json<PrefetchRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if req.images.is_empty() {
        return error(StatusCode::BAD_REQUEST, "no images given");
    }
    if req.images.len() > jobs::MAX_IMAGES {
        return error(StatusCode::BAD_REQUEST, format!("at most {} images per job", jobs::MAX_IMAGES));
    }
    if let Some(bad) = req.images.iter().find_map(|i| warm::target(&state.upstreams, i).err()) {
        return error(StatusCode::BAD_REQUEST, bad.to_string());
    }
    match jobs.start(state, req.images, req.platforms) {
        Ok(job) => {
            let location = HeaderValue::from_str(&format!("/prefetch/{}", job.id)).expect("hex id");
            (StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(job)).into_response()
        }
        Err(jobs::Busy) => {
            let msg = format!("{} prefetch jobs are running; retry when one has finished", jobs::MAX_RUNNING);
            let mut resp = error(StatusCode::TOO_MANY_REQUESTS, msg);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            resp
        }
    }
}

async fn prefetch_job(Extension(jobs): Extension<Arc<jobs::Jobs>>, Path(id): Path<String>) -> Response {
    match jobs.get(&id) {
        Some(job) => Json(job).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no prefetch job {id:?} (finished jobs are kept for a while)")),
    }
}

async fn prefetch_jobs(Extension(jobs): Extension<Arc<jobs::Jobs>>) -> Response {
    Json(json!({ "jobs": jobs.list() })).into_response()
}

async fn gc(State(state): State<AppState>) -> Response {
    match state.cache.gc(0).await {
        Ok(report) => Json(report).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, warm::chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(token_matches(&with("Bearer s3cret"), "s3cret"));
        assert!(token_matches(&with("bearer s3cret"), "s3cret"));
        for bad in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "Bearer "] {
            assert!(!token_matches(&with(bad), "s3cret"), "{bad}");
        }
        assert!(!token_matches(&HeaderMap::new(), "s3cret"));
    }
}
