//! An S3 endpoint that never finishes an upload part: it has no objects, starts multipart uploads, takes
//! the parts' requests and holds them without an answer, and records aborts. Only for the test of the
//! upload bound; every other bucket test runs against a real S3 server.

#![allow(dead_code)] // harness: not every helper is used by every test

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use tokio::net::TcpListener;

#[derive(Default)]
struct Seen {
    parts: AtomicUsize,
    aborts: AtomicUsize,
    part_seen: tokio::sync::Notify,
}

/// The running endpoint (stops with the test's runtime).
pub struct StuckS3 {
    /// `127.0.0.1:PORT`.
    pub host: String,
    seen: Arc<Seen>,
}

impl StuckS3 {
    /// Starts it on a free port.
    pub async fn start() -> StuckS3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Seen::default());
        let app = Router::new().route("/{*key}", any(answer)).with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        StuckS3 { host, seen }
    }

    /// Part uploads that reached it (and were never answered).
    pub fn parts(&self) -> usize {
        self.seen.parts.load(SeqCst)
    }

    /// Waits until a part upload has reached it.
    pub async fn part_reached(&self) {
        let seen = self.seen.part_seen.notified();
        if self.parts() == 0 {
            seen.await;
        }
    }

    /// Multipart uploads aborted.
    pub fn aborts(&self) -> usize {
        self.seen.aborts.load(SeqCst)
    }
}

async fn answer(State(seen): State<Arc<Seen>>, method: Method, Query(q): Query<HashMap<String, String>>) -> Response {
    match method {
        Method::POST if q.contains_key("uploads") => (
            StatusCode::OK,
            "<InitiateMultipartUploadResult><Bucket>wharf</Bucket><Key>k</Key><UploadId>stuck-1</UploadId>\
             </InitiateMultipartUploadResult>",
        )
            .into_response(),
        Method::PUT if q.contains_key("partNumber") => {
            seen.parts.fetch_add(1, SeqCst);
            seen.part_seen.notify_waiters();
            std::future::pending::<()>().await;
            unreachable!()
        }
        Method::DELETE if q.contains_key("uploadId") => {
            seen.aborts.fetch_add(1, SeqCst);
            StatusCode::NO_CONTENT.into_response()
        }
        // No objects: every lookup is a miss.
        _ => (StatusCode::NOT_FOUND, "<Error><Code>NoSuchKey</Code></Error>").into_response(),
    }
}
