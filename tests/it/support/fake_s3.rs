//! A fault-injecting S3 endpoint, for what a real server will not do on demand: it never finishes an upload
//! part (it starts multipart uploads, holds the parts' requests without an answer, and records aborts), and
//! it serves the objects a test puts (ranges included) only up to a given byte, breaking every response
//! there, or leaves reads unanswered. Every other bucket test runs against a real S3 server.

#![allow(dead_code)] // harness: not every helper is used by every test

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

#[derive(Default)]
struct Seen {
    parts: AtomicUsize,
    aborts: AtomicUsize,
    part_seen: tokio::sync::Notify,
    /// Objects by key (`blobs/sha256/<hex>`, without the bucket).
    objects: Mutex<HashMap<String, Bytes>>,
    /// Responses break at this byte of the object.
    break_at: Mutex<Option<u64>>,
    /// Reads get no answer at all.
    silent: std::sync::atomic::AtomicBool,
}

/// The running endpoint (stops with the test's runtime).
pub struct FakeS3 {
    /// `127.0.0.1:PORT`.
    pub host: String,
    seen: Arc<Seen>,
}

impl FakeS3 {
    /// Starts it on a free port.
    pub async fn start() -> FakeS3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Seen::default());
        let app = Router::new().route("/{*key}", any(answer)).with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeS3 { host, seen }
    }

    /// `wharf serve` flags and a config file (written to `dir`) pointing at this endpoint, with `extra`
    /// after the `[storage.s3]` keys.
    pub fn wharf_args(&self, dir: &std::path::Path, extra: &str) -> Vec<String> {
        let config = dir.join("fake-s3.toml");
        let toml = format!(
            "[storage.s3]\nbucket = \"wharf\"\nendpoint = \"http://{}\"\nallow_http = true\naccess_key_id = \"k\"\n\
             secret_access_key = \"s\"\n{extra}",
            self.host
        );
        std::fs::write(&config, toml).unwrap();
        vec!["--config".into(), config.display().to_string()]
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

    /// Holds `bytes` as object `key`.
    pub fn put(&self, key: &str, bytes: Bytes) {
        self.seen.objects.lock().unwrap().insert(key.to_owned(), bytes);
    }

    /// Breaks every response at byte `at` of its object (a request that starts there gets 503).
    pub fn break_at(&self, at: u64) {
        *self.seen.break_at.lock().unwrap() = Some(at);
    }

    /// Leaves every read without an answer (the connection stays open).
    pub fn go_silent(&self) {
        self.seen.silent.store(true, SeqCst);
    }

    /// Multipart uploads aborted.
    pub fn aborts(&self) -> usize {
        self.seen.aborts.load(SeqCst)
    }
}

async fn answer(
    State(seen): State<Arc<Seen>>,
    method: Method,
    Path(key): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let object = key.strip_prefix("wharf/").and_then(|k| seen.objects.lock().unwrap().get(k).cloned());
    if matches!(method, Method::GET | Method::HEAD) && seen.silent.load(SeqCst) {
        std::future::pending::<()>().await;
    }
    match method {
        Method::GET if object.is_some() => serve(&seen, object.unwrap(), &headers),
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

/// The object, or the range asked for, broken at `break_at`.
fn serve(seen: &Seen, object: Bytes, headers: &HeaderMap) -> Response {
    let total = object.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| r.strip_prefix("bytes="));
    let (start, end) = match range.and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: u64 = a.parse().unwrap();
            (a, if b.is_empty() { total } else { (b.parse::<u64>().unwrap() + 1).min(total) })
        }
        None => (0, total),
    };
    let cut = seen.break_at.lock().unwrap().unwrap_or(u64::MAX);
    if start >= cut {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let sent = object.slice(start as usize..end.min(cut) as usize);
    let broken = end > cut;
    // The full length is announced; a broken response stops short of it with an error.
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(sent)])
        .chain(futures_util::stream::iter(broken.then(|| Err(std::io::Error::other("broken on purpose")))));
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(header::CONTENT_LENGTH, (end - start).into());
    if range.is_some() {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        let value = format!("bytes {start}-{}/{total}", end - 1);
        response.headers_mut().insert(header::CONTENT_RANGE, value.parse().unwrap());
    }
    response
}
