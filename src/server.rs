//! Serves the router on a listener until shutdown, then drains: in-flight responses and fills get
//! `shutdown_grace` seconds to finish.

use crate::state::AppState;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

/// Runs until `shutdown` resolves, then waits up to `grace` for open connections and background fills.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    tasks: TaskTracker,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining");
    };
    if !serve_until(listener, crate::api::router(state), shutdown, grace).await? {
        return Ok(());
    }
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("background fills still running at shutdown; their temporary files are removed at next start");
    }
    Ok(())
}

/// Serves `app` on `listener` until `shutdown` resolves, then gives open connections up to `grace`. Returns
/// whether every connection finished in time. Also used for side listeners such as the admin API.
pub async fn serve_until(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<bool> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let deadline = async move {
        if rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        res = server => res.map(|()| true),
        _ = deadline => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
            Ok(false)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
