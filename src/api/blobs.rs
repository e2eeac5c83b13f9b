//! GET and HEAD of blobs: ask the cache, turn its handle and the `Range` header into a response.

use super::error::{Error, OciCode, Subject};
use super::range::{RangeAnswer, resolve};
use super::{RequestNote, Routed};
use crate::cache::{BlobHandle, reader};
use crate::oci::Digest;
use axum::body::Body;
use axum::response::Response;
use futures_util::{FutureExt, Stream, StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use std::pin::Pin;
use std::task::{Context, Poll};

/// `GET /v2/<name>/blobs/<digest>`.
/// `delivery`: how the connection sends the body (see [`reader::Delivery`]).
pub async fn get(
    routed: Routed,
    digest: Digest,
    headers: &HeaderMap,
    delivery: reader::Delivery,
) -> Result<Response, Error> {
    let Routed { state, client, repo, from_peer } = routed;
    let answer = if from_peer {
        state.cache.blob_for_peer(&client, &repo, &digest).await
    } else {
        state.cache.blob(&client, &repo, &digest).await
    };
    let (handle, outcome) = answer.map_err(|e| Error::cache(&e, Subject::Blob))?;
    let BlobHandle { source, size, guard } = handle;
    let size = match (size, &source) {
        (Some(size), _) => size,
        // No announced length: ranges and Content-Length need the size, so wait for the end.
        (None, reader::Source::Filling(fill)) => fill.wait_done().await.map_err(|e| Error::cache(&e, Subject::Blob))?,
        (None, reader::Source::Committed(_)) => unreachable!("committed blobs have a size"),
    };
    let metrics = state.metrics.clone();
    let filling = matches!(source, reader::Source::Filling(_));
    let mut note = RequestNote::new(client.name.clone(), outcome);
    if let reader::Source::Filling(fill) = &source
        && fill.via_peer()
    {
        note.source = "peer";
    }
    // The guard rides along with the body, so the blob is not evicted while it streams.
    let body = move |start, end| {
        reader::body(source, start, end, delivery).inspect_ok(move |chunk| {
            let _ = &guard;
            // Bytes for a peer are counted as peer bytes instead (the peer counts them as served again).
            if !from_peer {
                metrics.served_bytes.inc_by(chunk.len() as u64);
            }
        })
    };
    // A fill can fail before its first byte reaches this client, and hyper writes a response head together
    // with the first body bytes: an error on the body's first poll would close the connection with no answer
    // at all. A fill that has failed already gets a clean 503 here; one that fails later is reported after
    // the head (see `HeadFirst`), as a broken body.
    let body = move |start, end| {
        let mut stream = Box::pin(body(start, end));
        let first = if filling && start < end { stream.next().now_or_never().flatten() } else { None };
        match first {
            Some(Err(e)) => Err(Error::new(OciCode::Unavailable, format!("the upstream transfer failed: {e}"))),
            first => Ok(Body::from_stream(HeadFirst::new(futures_util::stream::iter(first).chain(stream)))),
        }
    };
    let etag = format!("\"{digest}\"");
    let mut resp = if if_none_match(headers, &etag) {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        match resolve(range, size) {
            RangeAnswer::Full => {
                let mut r = Response::new(body(0, size)?);
                set(&mut r, header::CONTENT_LENGTH, size.to_string());
                r
            }
            RangeAnswer::Partial { start, end } => {
                let mut r = Response::new(body(start, end + 1)?);
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                set(&mut r, header::CONTENT_LENGTH, (end + 1 - start).to_string());
                set(&mut r, header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
                r
            }
            RangeAnswer::Unsatisfiable => return Err(Error::unsatisfiable(size)),
        }
    };
    blob_headers(&mut resp, &digest, &etag);
    resp.extensions_mut().insert(note);
    Ok(resp)
}

/// A body stream whose first poll never ends it with an error: such an error is held back for one poll (the
/// task woken at once), so that hyper sends the response head first and the client sees a broken body, not a
/// connection closed without an answer.
struct HeadFirst<S> {
    inner: S,
    polled: bool,
    held: Option<std::io::Error>,
}

impl<S> HeadFirst<S> {
    fn new(inner: S) -> Self {
        HeadFirst { inner, polled: false, held: None }
    }
}

impl<S: Stream<Item = std::io::Result<bytes::Bytes>> + Unpin> Stream for HeadFirst<S> {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(e) = self.held.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let first = !std::mem::replace(&mut self.polled, true);
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Err(e))) if first => {
                self.held = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }
}

/// `HEAD /v2/<name>/blobs/<digest>`: never starts a download.
pub async fn head(routed: Routed, digest: Digest) -> Result<Response, Error> {
    let Routed { state, client, repo, .. } = routed;
    let (size, outcome) =
        state.cache.blob_info(&client, &repo, &digest).await.map_err(|e| Error::cache(&e, Subject::Blob))?;
    let mut resp = Response::new(Body::empty());
    set(&mut resp, header::CONTENT_LENGTH, size.to_string());
    blob_headers(&mut resp, &digest, &format!("\"{digest}\""));
    resp.extensions_mut().insert(RequestNote::new(client.name.clone(), outcome));
    Ok(resp)
}

fn blob_headers(resp: &mut Response, digest: &Digest, etag: &str) {
    set(resp, header::CONTENT_TYPE, "application/octet-stream".into());
    set(resp, header::HeaderName::from_static("docker-content-digest"), digest.to_string());
    set(resp, header::ETAG, etag.to_owned());
    set(resp, header::ACCEPT_RANGES, "bytes".into());
    set(resp, header::CACHE_CONTROL, "max-age=31536000".into());
}

/// True when `If-None-Match` names this ETag (or `*`).
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|t| {
        let t = t.trim();
        t == "*" || t == etag || t.strip_prefix("W/") == Some(etag)
    })
}

/// Sets a header whose value wharf built itself (digits, digests, fixed strings).
pub fn set(resp: &mut Response, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_on_the_first_poll_waits_one_poll_so_the_head_goes_out() {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let failing = futures_util::stream::iter([Err(std::io::Error::other("fill failed"))]);
        let mut body = HeadFirst::new(failing);
        assert!(body.poll_next_unpin(&mut cx).is_pending(), "the first poll ended the body");
        assert!(matches!(body.poll_next_unpin(&mut cx), Poll::Ready(Some(Err(_)))));
        // Later errors and data pass straight through.
        let chunks = vec![Ok(bytes::Bytes::from_static(b"x")), Err(std::io::Error::other("broken"))];
        let mut body = HeadFirst::new(futures_util::stream::iter(chunks));
        assert!(matches!(body.poll_next_unpin(&mut cx), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(body.poll_next_unpin(&mut cx), Poll::Ready(Some(Err(_)))));
    }
}
