//! One upstream registry's HTTP client: challenge-driven auth, manual redirects, manifest and blob fetches.
//! Redirects are followed by hand so credentials stay on the registry's own host and each hop gets its own auth.

use super::Error;
use super::auth::{TokenCache, TokenResponse, parse_challenges};
use super::creds::Credentials;
use super::flight::Flights;
use crate::metrics::{KindLabel, Metrics, RegistryLabel, UpstreamLabels};
use crate::oci::{AcceptSet, Digest, RepoName};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use std::pin::Pin;
use std::sync::Arc;
use url::Url;

/// Largest manifest wharf accepts from upstream (4 MiB, distribution's and containers/image's limit).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

/// A client for one configured registry.
#[derive(Debug)]
pub struct RegistryClient {
    /// The name clients use for this registry (`docker.io`).
    pub name: String,
    base: Url,
    http: reqwest::Client,
    creds: Option<Credentials>,
    tokens: Arc<TokenCache>,
    /// Token requests under way, by (cache key, scope): a burst of requests refused together asks once.
    token_flights: Flights<Result<Option<String>, Arc<Error>>>,
    max_redirects: usize,
    metrics: Arc<Metrics>,
}

/// What a manifest HEAD (or GET) told us about a manifest.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest: Option<Digest>,
    /// `Content-Type` without parameters.
    pub media_type: String,
    /// `Content-Length`.
    pub size: Option<u64>,
}

/// A streaming blob body from upstream.
pub struct BlobStream {
    /// `Content-Length`, when known.
    pub size: Option<u64>,
    /// For a 206: `(first, last, complete length)` from `Content-Range`.
    pub partial: Option<(u64, u64, u64)>,
    /// The bytes.
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>,
}

/// A pass-through answer (tags/list, referrers): status, the headers worth forwarding, and the body.
pub struct Passthrough {
    /// Upstream status.
    pub status: StatusCode,
    /// Content-Type, Link, OCI-Filters-Applied.
    pub headers: HeaderMap,
    /// The body, streamed.
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>,
}

/// On whose behalf a request is sent: wharf's configured credentials, nobody, or a client's own
/// `Authorization` header (checked against the upstream, never stored).
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// wharf's own credentials for this registry, if any.
    Wharf,
    /// No credentials: what any anonymous puller could fetch.
    Anonymous,
    /// The `Authorization` value a client sent to wharf.
    Client(&'a str),
}

/// What a [`RegistryClient::probe`] asks about.
#[derive(Debug, Clone)]
pub enum Probe {
    /// A manifest by tag or digest.
    Manifest(String),
    /// A blob.
    Blob(Digest),
    /// The repository itself (`tags/list?n=1`).
    Repository,
}

impl RegistryClient {
    /// A client for `base` sharing the process-wide connection pool `http`.
    pub fn new(
        name: String,
        base: Url,
        http: reqwest::Client,
        creds: Option<Credentials>,
        max_redirects: usize,
        metrics: Arc<Metrics>,
        flight_limit: std::time::Duration,
    ) -> Self {
        let tokens = Arc::new(TokenCache::default());
        let joined = metrics.upstream_joined.get_or_create(&KindLabel { kind: "token" }).clone();
        let token_flights = Flights::new(joined, flight_limit);
        RegistryClient { name, base, http, creds, tokens, token_flights, max_redirects, metrics }
    }

    fn url(&self, repo: &RepoName, tail: &str) -> Url {
        let mut u = self.base.clone();
        let path = format!("{}/v2/{}/{}", self.base.path().trim_end_matches('/'), repo, tail);
        u.set_path(&path);
        u
    }

    /// HEAD a manifest: digest, type and size without counting as a pull on Docker Hub.
    pub async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &AcceptSet,
    ) -> Result<ManifestHead, Error> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let resp = self.send(Method::HEAD, url, repo, accept_headers(accept), Identity::Wharf).await?;
        Ok(manifest_head(resp.headers()))
    }

    /// GET a manifest, byte-exact, refusing bodies over [`MAX_MANIFEST_SIZE`].
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &str,
        accept: &AcceptSet,
    ) -> Result<(ManifestHead, Bytes), Error> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let resp = self.send(Method::GET, url, repo, accept_headers(accept), Identity::Wharf).await?;
        let head = manifest_head(resp.headers());
        if head.size.is_some_and(|s| s > MAX_MANIFEST_SIZE as u64) {
            return Err(Error::Protocol("manifest larger than 4 MiB".into()));
        }
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk?);
            if body.len() > MAX_MANIFEST_SIZE {
                return Err(Error::Protocol("manifest larger than 4 MiB".into()));
            }
        }
        Ok((head, body.freeze()))
    }

    /// HEAD a blob: its size, without downloading it.
    pub async fn head_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, Error> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(Method::HEAD, url, repo, HeaderMap::new(), Identity::Wharf).await?;
        Ok(content_length(resp.headers()))
    }

    /// Whether `who` may read `what` in `repo`: a HEAD (a one-item tag list for the repository) that
    /// succeeds only if the upstream grants it. Answers with the upstream's refusal otherwise.
    pub async fn probe(&self, repo: &RepoName, what: &Probe, who: Identity<'_>) -> Result<(), Error> {
        let (method, tail, headers) = match what {
            Probe::Manifest(reference) => {
                (Method::HEAD, format!("manifests/{reference}"), accept_headers(&AcceptSet::all_manifests()))
            }
            Probe::Blob(digest) => (Method::HEAD, format!("blobs/{digest}"), HeaderMap::new()),
            Probe::Repository => (Method::GET, "tags/list".to_owned(), HeaderMap::new()),
        };
        let mut url = self.url(repo, &tail);
        if matches!(what, Probe::Repository) {
            url.set_query(Some("n=1"));
        }
        self.send(method, url, repo, headers, who).await.map(drop)
    }

    /// Whether wharf holds credentials for this registry (so it may fetch content anonymous clients cannot).
    pub fn has_credentials(&self) -> bool {
        self.creds.is_some()
    }

    /// GET a blob, or the inclusive byte range `range` of it, as a stream. The caller verifies the digest.
    pub async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<BlobStream, Error> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let mut headers = HeaderMap::new();
        // Transport compression would break digests and ranges; ask for the bytes as stored.
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        if let Some((first, last)) = range
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={first}-{last}"))
        {
            headers.insert(header::RANGE, v);
        }
        let resp = self.send(Method::GET, url, repo, headers, Identity::Wharf).await?;
        let size = content_length(resp.headers());
        let partial = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
                let parsed = content_range.and_then(parse_content_range);
                match (parsed, range) {
                    (Some(p), Some((first, _))) if p.0 == first => Some(p),
                    _ => {
                        return Err(Error::Protocol("206 with a Content-Range that does not match the request".into()));
                    }
                }
            }
            _ => None,
        };
        let body = resp.bytes_stream().map(|r| r.map_err(Error::from));
        Ok(BlobStream { size, partial, body: Box::pin(body) })
    }

    /// GET `/v2/<repo>/<tail>?<query>` and hand back the answer as is (tags/list, referrers).
    pub async fn passthrough(&self, repo: &RepoName, tail: &str, query: Option<&str>) -> Result<Passthrough, Error> {
        let mut url = self.url(repo, tail);
        url.set_query(query);
        let resp = self.send(Method::GET, url, repo, HeaderMap::new(), Identity::Wharf).await?;
        let mut headers = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::LINK, header::HeaderName::from_static("oci-filters-applied")] {
            if let Some(v) = resp.headers().get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let status = resp.status();
        let body = resp.bytes_stream().map(|r| r.map_err(Error::from));
        Ok(Passthrough { status, headers, body: Box::pin(body) })
    }

    /// Sends a request as `who`, answering auth challenges and following redirects; non-2xx statuses become
    /// errors. Tokens obtained for a client's own credentials are used for this request only, never cached.
    async fn send(
        &self,
        method: Method,
        mut url: Url,
        repo: &RepoName,
        headers: HeaderMap,
        who: Identity<'_>,
    ) -> Result<reqwest::Response, Error> {
        let scope = format!("repository:{repo}:pull");
        let mut redirects = 0;
        let mut auth_tried = false;
        let mut client_token: Option<String> = None;
        loop {
            let host = host_key(&url);
            let own_host = host == host_key(&self.base);
            let cache_key = match who {
                Identity::Wharf => Some(host.clone()),
                // Anonymous tokens are kept apart, so a probe never rides on wharf's credentials.
                Identity::Anonymous => Some(format!("anonymous {host}")),
                Identity::Client(_) => None,
            };
            let mut req = self.http.request(method.clone(), url.clone()).headers(headers.clone());
            let cached = match (&cache_key, &client_token) {
                (Some(key), _) => self.tokens.get(key, &scope),
                (None, Some(token)) => Some(token.clone()),
                (None, None) => None,
            };
            if let Some(value) = &cached {
                req = req.header(header::AUTHORIZATION, value);
            } else if own_host {
                match (who, &self.creds) {
                    (Identity::Wharf, Some(Credentials::Bearer(t))) => {
                        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
                    }
                    // A client's bearer token is for the registry itself; send it as the client did.
                    (Identity::Client(auth), _) if auth.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")) => {
                        req = req.header(header::AUTHORIZATION, auth);
                    }
                    _ => {}
                }
            }
            let resp = self.observe(req.send()).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !auth_tried {
                auth_tried = true;
                if let (Some(refused), Some(key)) = (&cached, &cache_key) {
                    self.tokens.remove(key, &scope, refused);
                }
                let challenge = resp.headers().get_all(header::WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok());
                let challenges: Vec<_> = challenge.flat_map(parse_challenges).collect();
                let creds = match who {
                    _ if !own_host => None,
                    Identity::Wharf => self.creds.clone(),
                    Identity::Anonymous => None,
                    // No Basic credentials to offer: an anonymous token must not stand in for the client's.
                    Identity::Client(auth) => match Credentials::from_basic_header(auth) {
                        Some(c) => Some(c),
                        None => return Err(Error::Unauthorized),
                    },
                };
                let value = match &cache_key {
                    Some(key) => self.shared_authorization(key, &scope, cached, creds, challenges).await?,
                    None => authorization(&self.http, &scope, creds.as_ref(), &challenges).await?.map(|(v, _)| v),
                };
                match (value, &cache_key) {
                    // Cached by `shared_authorization`.
                    (Some(_), Some(_)) => continue,
                    (Some(value), None) => {
                        client_token = Some(value);
                        continue;
                    }
                    (None, _) => return Err(Error::Unauthorized),
                }
            }
            if status.is_redirection() {
                redirects += 1;
                if redirects > self.max_redirects {
                    return Err(Error::Protocol("too many redirects".into()));
                }
                url = redirect_target(&url, resp.headers())?;
                auth_tried = false;
                client_token = None;
                continue;
            }
            if status.is_success() {
                return Ok(resp);
            }
            return Err(Error::from_status(status));
        }
    }

    /// Sends one request, recording its status, latency and any rate-limit headroom the upstream reports.
    async fn observe(
        &self,
        send: impl std::future::Future<Output = Result<reqwest::Response, reqwest::Error>>,
    ) -> Result<reqwest::Response, Error> {
        let start = std::time::Instant::now();
        let result = send.await;
        let registry = self.name.clone();
        let status = result.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        self.metrics.upstream_requests.get_or_create(&UpstreamLabels { registry: registry.clone(), status }).inc();
        let label = RegistryLabel { registry };
        self.metrics.upstream_latency.get_or_create(&label).observe(start.elapsed().as_secs_f64());
        let resp = result?;
        // Docker Hub: `ratelimit-remaining: 76;w=21600`.
        let remaining = resp.headers().get("ratelimit-remaining").and_then(|v| v.to_str().ok());
        if let Some(n) = remaining.and_then(|v| v.split(';').next()).and_then(|v| v.trim().parse::<i64>().ok()) {
            self.metrics.ratelimit_remaining.get_or_create(&label).set(n);
        }
        Ok(resp)
    }

    /// Counts blob bytes fetched from this registry.
    pub fn count_fetched(&self, bytes: u64) {
        self.metrics.upstream_bytes.get_or_create(&RegistryLabel { registry: self.name.clone() }).inc_by(bytes);
    }

    /// An `Authorization` value for `scope` from a host's challenges, cached under `key`; concurrent callers
    /// with the same key and scope share one token request. `refused` is the value the upstream just refused.
    async fn shared_authorization(
        &self,
        key: &str,
        scope: &str,
        refused: Option<String>,
        creds: Option<Credentials>,
        challenges: Vec<super::auth::Challenge>,
    ) -> Result<Option<String>, Error> {
        let (tokens, http) = (self.tokens.clone(), self.http.clone());
        let (key, scope) = (key.to_owned(), scope.to_owned());
        let flight = format!("{key} {scope}");
        let work = move || async move {
            // A token request that ended just before this one started may have cached what we need.
            if let Some(value) = tokens.get(&key, &scope).filter(|v| refused.as_ref() != Some(v)) {
                return Ok(Some(value));
            }
            let got = authorization(&http, &scope, creds.as_ref(), &challenges).await.map_err(Arc::new)?;
            Ok(got.map(|(value, lifetime)| {
                // Cached before the flight ends, so a request refused after it finds the token.
                tokens.put(&key, &scope, value.clone(), lifetime);
                value
            }))
        };
        let (answer, _) =
            self.token_flights.run(&flight, work).await.map_err(|lost| Error::Protocol(lost.to_string()))?;
        answer.map_err(|e| e.copy())
    }
}

/// Obtains an `Authorization` value (and how long it lasts) from a host's challenges, offering `creds`.
/// The caller passes credentials only for the registry's own host (the token realm it names gets them
/// too, as every registry client does), never for a redirect target.
async fn authorization(
    http: &reqwest::Client,
    scope: &str,
    creds: Option<&Credentials>,
    challenges: &[super::auth::Challenge],
) -> Result<Option<(String, std::time::Duration)>, Error> {
    if let Some(c) = challenges.iter().find(|c| c.scheme == "bearer") {
        let realm = c.params.get("realm").ok_or_else(|| Error::Protocol("bearer challenge without realm".into()))?;
        let mut realm = Url::parse(realm).map_err(|_| Error::Protocol("bad token realm".into()))?;
        if !matches!(realm.scheme(), "http" | "https") {
            return Err(Error::Protocol("bad token realm scheme".into()));
        }
        {
            let mut q = realm.query_pairs_mut();
            if let Some(service) = c.params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", c.params.get("scope").map(String::as_str).unwrap_or(scope));
        }
        let mut req = http.get(realm);
        if let Some(basic) = creds.and_then(Credentials::basic_header) {
            req = req.header(header::AUTHORIZATION, basic);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(match resp.status() {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Unauthorized,
                s => Error::from_status(s),
            });
        }
        let bytes = resp.bytes().await?;
        let token: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| Error::Protocol("token response is not JSON".into()))?;
        let (token, lifetime) =
            token.into_parts().ok_or_else(|| Error::Protocol("token response without token".into()))?;
        return Ok(Some((format!("Bearer {token}"), lifetime)));
    }
    if challenges.iter().any(|c| c.scheme == "basic")
        && let Some(basic) = creds.and_then(Credentials::basic_header)
    {
        // Basic credentials do not expire; a day bounds how long a changed password goes unnoticed.
        return Ok(Some((basic, std::time::Duration::from_secs(86_400))));
    }
    Ok(None)
}

fn accept_headers(accept: &AcceptSet) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = if accept.is_empty() { AcceptSet::all_manifests() } else { accept.clone() };
    if let Ok(v) = HeaderValue::from_str(&value.header_value()) {
        h.insert(header::ACCEPT, v);
    }
    h
}

fn manifest_head(h: &HeaderMap) -> ManifestHead {
    let digest = h.get("docker-content-digest").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse().ok());
    let media_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    ManifestHead { digest, media_type, size: content_length(h) }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// `bytes first-last/complete` (RFC 9110 §14.4); `None` for `*` lengths or malformed values.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let (range, complete) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, complete) = (first.parse().ok()?, last.parse().ok()?, complete.parse().ok()?);
    (first <= last && last < complete).then_some((first, last, complete))
}

fn host_key(url: &Url) -> String {
    format!("{}://{}:{}", url.scheme(), url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

/// Where a redirect leads: `Location` resolved against `from`, only to `http`/`https`.
pub fn redirect_target(from: &Url, headers: &HeaderMap) -> Result<Url, Error> {
    let location = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::Protocol("redirect without Location".into()))?;
    let next = from.join(location).map_err(|_| Error::Protocol("bad redirect Location".into()))?;
    if !matches!(next.scheme(), "http" | "https") {
        return Err(Error::Protocol("redirect to a non-HTTP scheme".into()));
    }
    // A TLS registry must not be able to send wharf's traffic (and signed URLs) over plain HTTP.
    if from.scheme() == "https" && next.scheme() == "http" {
        return Err(Error::Protocol("redirect from https to plain http".into()));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_relative_and_refuse_other_schemes() {
        let from = Url::parse("https://r.example/v2/a/blobs/x").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("/other?sig=a%2Fb"));
        assert_eq!(redirect_target(&from, &h).unwrap().as_str(), "https://r.example/other?sig=a%2Fb");
        h.insert(header::LOCATION, HeaderValue::from_static("file:///etc/passwd"));
        assert!(redirect_target(&from, &h).is_err());
        h.insert(header::LOCATION, HeaderValue::from_static("http://cdn.example/blob"));
        assert!(redirect_target(&from, &h).is_err(), "https must not redirect to http");
        let plain = Url::parse("http://r.example/v2/a/blobs/x").unwrap();
        assert!(redirect_target(&plain, &h).is_ok());
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range("bytes 0-99/*"), None);
        assert_eq!(parse_content_range("bytes 5-2/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
    }

    #[test]
    fn host_key_includes_port() {
        let a = Url::parse("http://127.0.0.1:80/x").unwrap();
        let b = Url::parse("http://127.0.0.1/y").unwrap();
        let c = Url::parse("http://127.0.0.1:81/y").unwrap();
        assert_eq!(host_key(&a), host_key(&b));
        assert_ne!(host_key(&a), host_key(&c));
    }
}
