//! The peer client: signed requests to other wharf instances, on connections bound to this node's own peer
//! address (so a peer sees the address it knows, and a firewall rule between two nodes applies).

use super::auth::{AUTH_HEADER, Keys, PEER_HEADER, now};
use crate::oci::{Digest, RepoName};
use crate::upstream::{self, BlobStream, ManifestHead};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Why a peer could not answer; every case means "try the next source".
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection (refused, unreachable, or not within the connect timeout).
    #[error("peer unreachable: {0}")]
    Connect(#[source] reqwest::Error),
    /// The peer answered with an error status.
    #[error("peer answered {0}")]
    Status(StatusCode),
    /// The connection failed after it was made (reset, timeout).
    #[error("peer transport error: {0}")]
    Transport(#[source] reqwest::Error),
    /// The answer made no sense (wrong range, missing headers).
    #[error("peer protocol error: {0}")]
    Protocol(String),
}

impl PeerError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PeerError::Connect(_) => "unreachable",
            PeerError::Status(s) if *s == StatusCode::UNAUTHORIZED => "unauthorized",
            PeerError::Status(_) => "status",
            PeerError::Transport(_) => "transport",
            PeerError::Protocol(_) => "protocol",
        }
    }

    /// Whether the peer itself looks down (as opposed to answering that it cannot help).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PeerError::Connect(_)) || matches!(self, PeerError::Transport(e) if e.is_timeout())
    }
}

impl From<reqwest::Error> for PeerError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_connect() { PeerError::Connect(e) } else { PeerError::Transport(e) }
    }
}

/// The header on a peer's manifest answer that says how it answered (`hit`, `revalidated`, `stale`…): a
/// stale answer (its upstream failed) must not be recorded as freshly checked.
pub const OUTCOME_HEADER: &str = "x-wharf-outcome";

/// A manifest from a peer.
#[derive(Debug)]
pub struct PeerManifest {
    /// Digest, media type, size.
    pub head: ManifestHead,
    /// The bytes, for a GET.
    pub bytes: Option<Bytes>,
    /// The peer served its last known answer because its upstream failed.
    pub stale: bool,
}

/// What a peer reports about its own fill of a blob (`GET /_wharf/fill/<digest>`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FillStatus {
    /// `filling`, `done` (on disk) or `none`.
    pub state: String,
    /// Bytes written so far.
    pub written: u64,
    /// The announced size, when known.
    pub total: Option<u64>,
    /// Milliseconds since the fill last received a byte from its own source.
    pub stalled_ms: u64,
}

/// Signed HTTP/1.1 requests to peers: one pooled connection per blob stream (no shared HTTP/2 connection,
/// whose flow control would couple the streams).
#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    me: String,
    keys: Arc<RwLock<Keys>>,
}

impl PeerClient {
    /// A client whose connections leave from `bind` (this node's peer address) and give up connecting after
    /// `connect_timeout`. No read timeout: the caller watches for stalls, which depend on what is asked.
    pub fn new(
        me: String,
        bind: Option<std::net::IpAddr>,
        keys: Arc<RwLock<Keys>>,
        connect_timeout: Duration,
    ) -> Result<PeerClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .local_address(bind)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .no_proxy()
            .user_agent(concat!("wharf-peer/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(PeerClient { http, me, keys })
    }

    /// A peer's URL; an address that does not parse is an error, never a made-up host that signed requests
    /// could reach.
    fn url(peer: &str, path: &str, registry: Option<&str>) -> Result<url::Url, PeerError> {
        let mut u = url::Url::parse(&format!("http://{peer}"))
            .map_err(|e| PeerError::Protocol(format!("peer address {peer:?}: {e}")))?;
        u.set_path(path);
        if let Some(r) = registry {
            u.query_pairs_mut().append_pair("ns", r);
        }
        Ok(u)
    }

    /// A signed request: the signature covers method, path and query exactly as sent.
    fn request(&self, method: Method, url: url::Url, mut headers: HeaderMap) -> reqwest::RequestBuilder {
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let sig = self.keys.read().unwrap().sign(method.as_str(), &target, now(), &self.me);
        if let (Ok(me), Ok(sig)) = (HeaderValue::from_str(&self.me), HeaderValue::from_str(&sig)) {
            headers.insert(PEER_HEADER, me);
            headers.insert(AUTH_HEADER, sig);
        }
        self.http.request(method, url).headers(headers)
    }

    /// Sends a signed request (bounded by `limit` when given); a status other than 2xx is an error.
    async fn call(
        &self,
        method: Method,
        url: url::Url,
        headers: HeaderMap,
        limit: Option<Duration>,
    ) -> Result<reqwest::Response, PeerError> {
        let mut req = self.request(method, url, headers);
        if let Some(limit) = limit {
            req = req.timeout(limit);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(PeerError::Status(resp.status()));
        }
        Ok(resp)
    }

    /// Blob `digest` of `registry`'s `repo` from `peer`, from byte `from` on. The peer serves it from disk or
    /// from its own fill (which it may start), never from another peer.
    pub async fn get_blob(
        &self,
        peer: &str,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobStream, PeerError> {
        let url = PeerClient::url(peer, &format!("/v2/{repo}/blobs/{digest}"), Some(registry))?;
        let mut headers = HeaderMap::new();
        if from > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={from}-"))
        {
            headers.insert(header::RANGE, v);
        }
        let resp = self.call(Method::GET, url, headers, None).await?;
        let status = resp.status();
        let size = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let partial = if status == StatusCode::PARTIAL_CONTENT {
            let range = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
            match range.and_then(upstream::fuzzing::parse_content_range) {
                Some(p) if p.0 == from => Some(p),
                _ => return Err(PeerError::Protocol("206 with a Content-Range that does not match".into())),
            }
        } else {
            None
        };
        let body = resp.bytes_stream().map(|r| r.map_err(upstream::Error::from));
        Ok(BlobStream { size, partial, body: Box::pin(body) })
    }

    /// A manifest (HEAD, or GET with its bytes) from `peer`, which answers from its cache or asks the upstream
    /// itself (and keeps the tag fresh for the cluster).
    pub async fn manifest(
        &self,
        peer: &str,
        registry: &str,
        repo: &RepoName,
        reference: &str,
        accept: &str,
        want_body: bool,
    ) -> Result<PeerManifest, PeerError> {
        let url = PeerClient::url(peer, &format!("/v2/{repo}/manifests/{reference}"), Some(registry))?;
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            headers.insert(header::ACCEPT, v);
        }
        let method = if want_body { Method::GET } else { Method::HEAD };
        // A manifest is small: a peer that takes longer than this is not worth waiting for.
        let resp = self.call(method, url, headers, Some(Duration::from_secs(30))).await?;
        let h = resp.headers();
        let digest = h.get("docker-content-digest").and_then(|v| v.to_str().ok()?.trim().parse().ok());
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let size = h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
        let stale = h.get(OUTCOME_HEADER).is_some_and(|v| v == "stale");
        let head = ManifestHead { digest, media_type, size };
        if !want_body {
            return Ok(PeerManifest { head, bytes: None, stale });
        }
        if size.is_some_and(|s| s > upstream::MAX_MANIFEST_SIZE as u64) {
            return Err(PeerError::Protocol("manifest larger than 4 MiB".into()));
        }
        let mut body = bytes::BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.map_err(PeerError::Transport)?);
            if body.len() > upstream::MAX_MANIFEST_SIZE {
                return Err(PeerError::Protocol("manifest larger than 4 MiB".into()));
            }
        }
        Ok(PeerManifest { head, bytes: Some(body.freeze()), stale })
    }

    /// How `peer`'s own fill of `digest` is going; bounded by `limit` (a stopped peer must not hold the caller).
    pub async fn fill_status(&self, peer: &str, digest: &Digest, limit: Duration) -> Result<FillStatus, PeerError> {
        let url = PeerClient::url(peer, &format!("/_wharf/fill/{digest}"), None)?;
        let resp = self.call(Method::GET, url, HeaderMap::new(), Some(limit)).await?;
        let body = resp.bytes().await.map_err(PeerError::Transport)?;
        serde_json::from_slice(&body).map_err(|e| PeerError::Protocol(e.to_string()))
    }
}
