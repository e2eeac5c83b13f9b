//! Serves the router on a listener until shutdown, then drains: in-flight responses and fills get
//! `shutdown_grace` seconds to finish. Owns the connection-level limits (header read timeout, idle timeout,
//! header size, connection count) and TLS, which `axum::serve` does not offer.

mod conn;
pub mod tls;

use crate::config::ServerSettings;
use crate::state::AppState;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

/// How a listener treats its connections.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Time from the first byte of an HTTP/1.1 request head to its end (and for a TLS handshake); a
    /// keep-alive connection waiting for its next request is not timed by it.
    pub header_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// TLS, when configured.
    pub tls: Option<tls::Acceptor>,
}

impl Listen {
    /// The registry listener's settings.
    pub fn from_settings(s: &ServerSettings) -> Result<Listen, tls::Error> {
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(tls::Acceptor::new(cert, key)?),
            _ => None,
        };
        Ok(Listen {
            header_timeout: Duration::from_secs(s.header_timeout.max(1)),
            idle_timeout: Duration::from_secs(s.idle_timeout.max(1)),
            max_header_bytes: s.max_header_bytes,
            max_connections: s.max_connections,
            tls,
        })
    }

    /// Side listeners (the admin API): the default limits, plain HTTP.
    pub fn plain() -> Listen {
        let mut l = Listen::from_settings(&ServerSettings::default()).expect("no TLS, nothing to load");
        l.max_connections = 64;
        l
    }
}

/// Runs until `shutdown` resolves, then waits up to `grace` for open connections and background fills.
pub async fn run(
    listener: TcpListener,
    listen: Listen,
    state: AppState,
    tasks: TaskTracker,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; draining");
    };
    if !serve_until(listener, crate::api::router(state), &listen, shutdown, grace).await? {
        return Ok(());
    }
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!("background fills still running at shutdown; their temporary files are removed at next start");
    }
    Ok(())
}

/// Serves `app` on `listener` until `shutdown` resolves, then gives open connections up to `grace`. Returns
/// whether every connection finished in time.
pub async fn serve_until(
    listener: TcpListener,
    app: axum::Router,
    listen: &Listen,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<bool> {
    let builder = Arc::new(conn::builder(listen));
    let http1 = Arc::new(conn::http1_builder(listen));
    let permits = Arc::new(Semaphore::new(listen.max_connections));
    let (drain_tx, drain_rx) = watch::channel(false);
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Past the limit, connections wait in the kernel's accept queue rather than being refused.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays up.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let job = conn::Job {
            app: app.clone(),
            builder: builder.clone(),
            http1: http1.clone(),
            tls: listen.tls.clone(),
            header_timeout: listen.header_timeout,
            idle_timeout: listen.idle_timeout,
            drain: drain_rx.clone(),
        };
        connections.spawn(async move {
            let _permit = permit;
            job.serve(stream).await;
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    connections.close();
    if tokio::time::timeout(grace, connections.wait()).await.is_ok() {
        return Ok(true);
    }
    tracing::warn!("shutdown grace period over; closing remaining connections");
    Ok(false)
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

/// Raises the soft limit on open files to the hard limit: every client connection, upstream connection and
/// open blob file is a descriptor, and the usual soft limit (1024) is far below `server.max_connections`.
/// Returns the (old, new) soft limit, and the hard limit.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit for the call to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: a valid rlimit; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur, limit.rlim_max))
}
