//! tags/list and referrers: forwarded to the upstream and streamed back, not cached.

use super::error::{Error, Subject};
use super::{RequestNote, Routed};
use crate::cache::Outcome;
use axum::body::Body;
use axum::response::Response;
use futures_util::TryStreamExt;

/// Forwards `GET /v2/<name>/<tail>?<query>` (without wharf's own `ns` parameter).
pub async fn forward(routed: Routed, tail: &str, query: Option<&str>) -> Result<Response, Error> {
    let Routed { client, repo, .. } = routed;
    let query: Option<String> = query.map(|q| {
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(url::form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k != "ns"))
            .finish()
    });
    let query = query.filter(|q| !q.is_empty());
    let answer = client
        .passthrough(&repo, tail, query.as_deref())
        .await
        .map_err(|e| Error::upstream(&e, Subject::Repository))?;
    let body = Body::from_stream(answer.body.map_err(std::io::Error::other));
    let mut resp = Response::new(body);
    *resp.status_mut() = answer.status;
    *resp.headers_mut() = answer.headers;
    resp.extensions_mut().insert(RequestNote::new(client.name.clone(), Outcome::Passthrough));
    Ok(resp)
}
