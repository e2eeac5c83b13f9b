//! GET and HEAD of manifests: the exact bytes and exact `Content-Type` the upstream sent.

use super::blobs::{if_none_match, set};
use super::error::{Error, Subject};
use super::range::{RangeAnswer, resolve};
use super::{RequestNote, Routed};
use crate::oci::{AcceptSet, Reference};
use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, StatusCode, header};

/// `GET` (`want_body`) or `HEAD /v2/<name>/manifests/<reference>`.
pub async fn get_or_head(
    routed: Routed,
    reference: Reference,
    headers: &HeaderMap,
    want_body: bool,
) -> Result<Response, Error> {
    let Routed { state, client, repo, from_peer } = routed;
    let accept = AcceptSet::from_headers(headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()));
    let answer = if from_peer {
        state.cache.manifest_for_peer(&client, &repo, &reference, &accept, want_body).await
    } else {
        state.cache.manifest(&client, &repo, &reference, &accept, want_body).await
    };
    let answer = answer.map_err(|e| Error::cache(&e, Subject::Manifest))?;
    let info = &answer.info;
    let etag = format!("\"{}\"", info.digest);
    let mut resp = match answer.bytes {
        None => {
            let mut r = Response::new(Body::empty());
            set(&mut r, header::CONTENT_LENGTH, info.size.to_string());
            r
        }
        Some(_) if if_none_match(headers, &etag) => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        }
        // containerd 2.1.0–2.1.2 sends `Range: bytes=0-` on manifests too: answered like any range request.
        Some(bytes) => match resolve(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), info.size) {
            RangeAnswer::Full => {
                let mut r = Response::new(Body::from(bytes));
                set(&mut r, header::CONTENT_LENGTH, info.size.to_string());
                r
            }
            RangeAnswer::Partial { start, end } => {
                let part = bytes.slice(start as usize..=end as usize);
                let mut r = Response::new(Body::from(part));
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                set(&mut r, header::CONTENT_LENGTH, (end + 1 - start).to_string());
                set(&mut r, header::CONTENT_RANGE, format!("bytes {start}-{end}/{}", info.size));
                r
            }
            RangeAnswer::Unsatisfiable => return Err(Error::unsatisfiable(info.size)),
        },
    };
    set(&mut resp, header::CONTENT_TYPE, info.media_type.clone());
    set(&mut resp, header::HeaderName::from_static("docker-content-digest"), info.digest.to_string());
    set(&mut resp, header::ETAG, etag);
    resp.extensions_mut().insert(RequestNote::new(client.name.clone(), answer.outcome));
    Ok(resp)
}
