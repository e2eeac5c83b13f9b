//! Operational endpoints: `/healthz` (the process answers) and `/readyz` (the data directory is writable).

use crate::state::AppState;
use axum::extract::State;
use http::StatusCode;

/// Liveness: answering at all is the signal.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: creating (and removing) a temporary file proves the storage is writable.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    let store = state.cache.store().clone();
    match tokio::task::spawn_blocking(move || store.temp().map(drop)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "storage not writable\n"),
    }
}
