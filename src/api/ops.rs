//! Operational endpoints: `/healthz` (the process answers) and `/readyz` (the data directory is writable, the
//! metadata database works, and with a cluster the peer listener serves).

use crate::state::AppState;
use axum::extract::State;
use http::StatusCode;

/// Prometheus metrics in the text exposition format (OpenMetrics flavour, which Prometheus reads).
pub async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let cache = state.cache.clone();
    // statvfs for the disk gauges is a syscall on the data directory: keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || cache.usage()).await;
    state.metrics.fills_in_flight.set(state.cache.fills_in_flight() as i64);
    (
        [(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
}

/// Liveness: answering at all is the signal.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: creating (and removing) a temporary file proves the storage is writable. A failed metadata
/// database is not ready either: wharf serves what the files hold and repairs it in the background.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if !state.cache.metadata_healthy() {
        return (StatusCode::SERVICE_UNAVAILABLE, "metadata database unavailable\n");
    }
    if state.cache.cluster().is_some_and(|c| !c.is_listening()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "peer API listener not serving\n");
    }
    let store = state.cache.store().clone();
    match tokio::task::spawn_blocking(move || store.temp().map(drop)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "storage not writable\n"),
    }
}
