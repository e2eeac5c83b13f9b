//! The load generator: one [`Node`] is one pulling machine (its own connection pool and its own limit on
//! concurrent blob requests); it fetches blobs the way real clients do and checks every digest.
//!
//! Modes ([`Mode`]):
//! * `whole`: one `GET` per blob (Docker, podman, containerd with the parallel fetch off);
//! * `chunked`: containerd 2.1+ parallel layer fetch (`core/remotes/docker/fetcher.go`): the first `GET` has
//!   `Range: bytes=0-`; if the answer is 206 (or its `Content-Range` starts at 0) and longer than the chunk
//!   size C, chunk i>0 is `Range: bytes=i*C-` (open-ended), each response dropped after C bytes (which
//!   closes the connection), at most P chunks in flight and buffered in memory, hashed in order; a 200
//!   without `Content-Range` means one serial download;
//! * `ranges`: bounded `Range: bytes=a-b` chunks of C bytes, P in flight, each a full response (keep-alive);
//! * `multi`: one request with `Range: bytes=a-b,c-d,…` (4 parts covering the blob); a 206
//!   `multipart/byteranges` answer is parsed, a 200 is taken whole.
//!
//! A node's semaphore is held for every HTTP request, like containerd 2.x's `max_concurrent_downloads` (3),
//! which caps layers × chunks, and like Docker's 3 concurrent layer downloads.

use crate::origin::{ACCEPT_MANIFESTS, Blob, Image};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// How a blob is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Whole,
    /// containerd 2.1+: chunk size, parallelism.
    Chunked(u64, usize),
    /// Bounded ranges: chunk size, parallelism.
    Ranges(u64, usize),
    /// One multi-range request with this many parts.
    Multi(usize),
}

impl Mode {
    /// Short name for tables.
    pub fn name(self) -> String {
        match self {
            Mode::Whole => "whole".into(),
            Mode::Chunked(c, p) => format!("containerd {}M×{p}", c >> 20),
            Mode::Ranges(c, p) => format!("ranges {}M×{p}", c >> 20),
            Mode::Multi(n) => format!("multi-range ×{n}"),
        }
    }
}

/// One pulling machine.
#[derive(Clone)]
pub struct Node {
    http: reqwest::Client,
    downloads: Arc<Semaphore>,
}

impl Node {
    /// A node with its own connection pool and `downloads` concurrent requests.
    pub fn new(downloads: usize) -> Node {
        let http = reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(900))
            .build()
            .expect("reqwest client");
        Node { http, downloads: Arc::new(Semaphore::new(downloads.max(1))) }
    }
}

/// What one blob fetch measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlobStats {
    /// From sending the first request to its first body byte.
    pub ttfb: Duration,
    pub bytes: u64,
    pub requests: u64,
}

/// What one image pull measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct PullStats {
    pub wall: Duration,
    /// Of the first layer.
    pub ttfb: Duration,
    pub bytes: u64,
    pub requests: u64,
}

type R<T> = Result<T, String>;

/// Pulls `img` from `base`: manifest by tag (digest checked), then config and layers, all dispatched at once
/// and limited by the node's semaphore.
pub async fn pull(node: &Node, base: &str, img: &Image, mode: Mode) -> R<PullStats> {
    let t0 = Instant::now();
    let url = format!("{base}/v2/{}/manifests/{}", img.repo, img.tag);
    let r =
        node.http.get(&url).header("accept", ACCEPT_MANIFESTS).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("GET {url}: {}", r.status()));
    }
    let body = r.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    if got != img.manifest_digest {
        return Err(format!("{url}: manifest digest {got}, want {}", img.manifest_digest));
    }
    let fetches = img.blobs().into_iter().map(|b| fetch_blob(node, base, &img.repo, b, mode, None));
    let results = futures_util::future::join_all(fetches).await;
    let mut stats = PullStats { bytes: body.len() as u64, requests: 1, ..Default::default() };
    for (i, r) in results.into_iter().enumerate() {
        let s = r?;
        if i == 1 {
            stats.ttfb = s.ttfb;
        }
        stats.bytes += s.bytes;
        stats.requests += s.requests;
    }
    stats.wall = t0.elapsed();
    Ok(stats)
}

/// Fetches one blob with `mode`, adding the bytes hashed so far to `progress`.
pub async fn fetch_blob(
    node: &Node,
    base: &str,
    repo: &str,
    blob: &Blob,
    mode: Mode,
    progress: Option<&AtomicU64>,
) -> R<BlobStats> {
    let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
    let mut hasher = Sha256::new();
    let mut stats = match mode {
        Mode::Whole => whole(node, &url, &mut hasher, progress).await?,
        Mode::Chunked(c, p) => chunked(node, &url, blob.size, c, p, &mut hasher, progress).await?,
        Mode::Ranges(c, p) => ranges(node, &url, blob.size, c, p, &mut hasher, progress).await?,
        Mode::Multi(n) => multi(node, &url, blob.size, n, &mut hasher).await?,
    };
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if stats.bytes != blob.size || got != blob.digest {
        return Err(format!("{url} ({}): got {} bytes {got}, want {} bytes", mode.name(), stats.bytes, blob.size));
    }
    stats.bytes = blob.size;
    Ok(stats)
}

/// Spends one unit of tokio's cooperative budget after hashing a chunk. A client hashing a body that
/// arrives faster than it hashes would otherwise never yield (hyper's body channel is outside tokio's
/// budget), and on this 2-core runtime two such clients starve every other client task, such as a late
/// joiner waiting for its first byte, for 100 ms and more. containerd's Go scheduler preempts; this is the
/// tokio equivalent.
async fn cooperate() {
    tokio::task::consume_budget().await;
}

fn add(progress: Option<&AtomicU64>, n: usize) {
    if let Some(p) = progress {
        p.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A blob `GET`. It offers compression as containerd does (`fetcher.go`); the client never decodes, so a
/// server that applied `Content-Encoding` to a blob fails the digest check.
async fn send(node: &Node, url: &str, range: Option<String>) -> R<reqwest::Response> {
    let mut req = node.http.get(url).header("accept-encoding", "zstd;q=1.0, gzip;q=0.8, deflate;q=0.5");
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: status {}", resp.status()));
    }
    Ok(resp)
}

async fn whole(node: &Node, url: &str, hasher: &mut Sha256, progress: Option<&AtomicU64>) -> R<BlobStats> {
    let _permit = node.downloads.acquire().await.map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut resp = send(node, url, None).await?;
    let mut stats = BlobStats { requests: 1, ..Default::default() };
    let mut first = true;
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: body: {e}"))? {
        if first {
            stats.ttfb = t.elapsed();
            first = false;
        }
        hasher.update(&chunk);
        cooperate().await;
        stats.bytes += chunk.len() as u64;
        add(progress, chunk.len());
    }
    Ok(stats)
}

/// Reads up to `limit` body bytes into a buffer, then drops the response (closing the connection early).
/// With `first_byte = (start, cell)`, stores the time from `start` to the first body byte in `cell`.
async fn read_prefix(
    mut resp: reqwest::Response,
    limit: u64,
    url: &str,
    first_byte: Option<(Instant, &std::sync::Mutex<Option<Duration>>)>,
) -> R<Vec<u8>> {
    let mut buf = Vec::with_capacity(limit as usize);
    while (buf.len() as u64) < limit {
        match resp.chunk().await.map_err(|e| format!("GET {url}: body: {e}"))? {
            Some(c) => {
                if buf.is_empty()
                    && let Some((t, cell)) = first_byte
                {
                    *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.elapsed());
                }
                let take = (limit - buf.len() as u64).min(c.len() as u64) as usize;
                buf.extend_from_slice(&c[..take]);
            }
            None => break,
        }
    }
    Ok(buf)
}

fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

fn content_range(resp: &reqwest::Response) -> Option<String> {
    resp.headers().get("content-range").and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// containerd 2.1+ `dockerFetcher.open` with `concurrent_layer_fetch_buffer = chunk`.
async fn chunked(
    node: &Node,
    url: &str,
    size: u64,
    chunk: u64,
    par: usize,
    hasher: &mut Sha256,
    progress: Option<&AtomicU64>,
) -> R<BlobStats> {
    let permit = node.downloads.acquire().await.map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut first = send(node, url, Some("bytes=0-".into())).await?;
    let mut stats = BlobStats { requests: 1, ..Default::default() };
    let offset_ok = first.status().as_u16() == 206 || content_range(&first).is_some_and(|c| c.starts_with("bytes 0-"));
    let remaining = content_length(&first).unwrap_or(size);
    if !offset_ok || remaining <= chunk {
        // Serial: errContentRangeIgnored (P forced to 1), or the blob fits in one chunk.
        let mut got_first = false;
        while let Some(c) = first.chunk().await.map_err(|e| format!("GET {url}: body: {e}"))? {
            if !got_first {
                stats.ttfb = t.elapsed();
                got_first = true;
            }
            hasher.update(&c);
            cooperate().await;
            stats.bytes += c.len() as u64;
            add(progress, c.len());
        }
        return Ok(stats);
    }
    let n = remaining.div_ceil(chunk);
    let p = par.min(n as usize).max(1);
    let first_cell = std::sync::Mutex::new(Some((first, permit)));
    let ttfb_cell = std::sync::Mutex::new(None);
    let fetch = |i: u64| {
        let taken = if i == 0 { first_cell.lock().unwrap_or_else(|e| e.into_inner()).take() } else { None };
        let ttfb_cell = &ttfb_cell;
        async move {
            let len = chunk.min(remaining - i * chunk);
            let (resp, _permit) = match taken {
                Some((resp, permit)) => (resp, permit),
                None => {
                    let permit = node.downloads.acquire().await.map_err(|e| e.to_string())?;
                    (send(node, url, Some(format!("bytes={}-", i * chunk))).await?, permit)
                }
            };
            let first_byte = (i == 0).then_some((t, ttfb_cell));
            read_prefix(resp, len, url, first_byte).await
        }
    };
    let mut chunks = futures_util::stream::iter(0..n).map(fetch).buffered(p);
    while let Some(data) = chunks.next().await {
        let data = data?;
        hasher.update(&data);
        cooperate().await;
        stats.bytes += data.len() as u64;
        stats.requests += 1;
        add(progress, data.len());
    }
    stats.requests -= 1; // chunk 0 reused the first response
    stats.ttfb = ttfb_cell.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
    Ok(stats)
}

/// Bounded `bytes=a-b` chunks, P in flight, every response checked (206, exact `Content-Range`).
async fn ranges(
    node: &Node,
    url: &str,
    size: u64,
    chunk: u64,
    par: usize,
    hasher: &mut Sha256,
    progress: Option<&AtomicU64>,
) -> R<BlobStats> {
    let n = size.div_ceil(chunk).max(1);
    let t = Instant::now();
    let ttfb_cell = std::sync::Mutex::new(None);
    let fetch = |i: u64| {
        let ttfb_cell = &ttfb_cell;
        async move {
            let _permit = node.downloads.acquire().await.map_err(|e| e.to_string())?;
            let (a, b) = (i * chunk, ((i + 1) * chunk).min(size).saturating_sub(1));
            let resp = send(node, url, Some(format!("bytes={a}-{b}"))).await?;
            let want = format!("bytes {a}-{b}/{size}");
            if size > 0 && (resp.status().as_u16() != 206 || content_range(&resp).as_deref() != Some(want.as_str())) {
                return Err(format!(
                    "GET {url} bytes={a}-{b}: {} {:?}, want 206 {want}",
                    resp.status(),
                    content_range(&resp)
                ));
            }
            let mut resp = resp;
            let mut data = Vec::with_capacity((b + 1 - a) as usize);
            while let Some(c) = resp.chunk().await.map_err(|e| format!("GET {url}: body: {e}"))? {
                if i == 0 && data.is_empty() {
                    *ttfb_cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.elapsed());
                }
                data.extend_from_slice(&c);
            }
            Ok::<_, String>(data)
        }
    };
    let mut stats = BlobStats::default();
    let mut chunks = futures_util::stream::iter(0..n).map(fetch).buffered(par.max(1));
    while let Some(data) = chunks.next().await {
        let data = data?;
        hasher.update(&data);
        cooperate().await;
        stats.bytes += data.len() as u64;
        stats.requests += 1;
        add(progress, data.len());
    }
    stats.ttfb = ttfb_cell.lock().unwrap_or_else(|e| e.into_inner()).unwrap_or_default();
    Ok(stats)
}

/// One request for `parts` contiguous ranges covering the blob.
async fn multi(node: &Node, url: &str, size: u64, parts: usize, hasher: &mut Sha256) -> R<BlobStats> {
    let _permit = node.downloads.acquire().await.map_err(|e| e.to_string())?;
    let parts = (parts as u64).clamp(1, size.max(1));
    let step = size.div_ceil(parts).max(1);
    let spec: Vec<String> = (0..parts)
        .map(|i| (i * step, ((i + 1) * step).min(size)))
        .filter(|(a, b)| a < b)
        .map(|(a, b)| format!("{a}-{}", b - 1))
        .collect();
    let t = Instant::now();
    let mut resp = send(node, url, Some(format!("bytes={}", spec.join(",")))).await?;
    let mut stats = BlobStats { requests: 1, ..Default::default() };
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let status = resp.status().as_u16();
    let boundary =
        ctype.split(';').find_map(|p| p.trim().strip_prefix("boundary=")).map(|b| b.trim_matches('"').to_string());
    let mut parser = match (status, boundary) {
        (200, _) => None,
        (206, Some(b)) if ctype.starts_with("multipart/byteranges") => Some(Multipart::new(&b)),
        (206, _) => {
            // One part: only acceptable if it is the whole blob.
            let cr = content_range(&resp).unwrap_or_default();
            if cr != format!("bytes 0-{}/{size}", size.saturating_sub(1)) {
                return Err(format!("GET {url} multi-range: single part {cr:?}"));
            }
            None
        }
        (s, _) => return Err(format!("GET {url} multi-range: status {s}")),
    };
    let mut first = true;
    while let Some(c) = resp.chunk().await.map_err(|e| format!("GET {url}: body: {e}"))? {
        if first {
            stats.ttfb = t.elapsed();
            first = false;
        }
        match &mut parser {
            None => {
                hasher.update(&c);
                cooperate().await;
                stats.bytes += c.len() as u64;
            }
            Some(p) => stats.bytes += p.feed(&c, hasher).map_err(|e| format!("GET {url} multi-range: {e}"))?,
        }
        cooperate().await;
    }
    if let Some(p) = parser
        && !p.finished
    {
        return Err(format!("GET {url} multi-range: body ended inside the multipart answer"));
    }
    Ok(stats)
}

/// A streaming `multipart/byteranges` reader that hashes part bodies, which must be contiguous and in order.
struct Multipart {
    boundary: Vec<u8>,
    pending: Vec<u8>,
    /// Body bytes left in the current part.
    body_left: u64,
    next_offset: u64,
    finished: bool,
}

impl Multipart {
    fn new(boundary: &str) -> Multipart {
        Multipart {
            boundary: format!("--{boundary}").into_bytes(),
            pending: Vec::new(),
            body_left: 0,
            next_offset: 0,
            finished: false,
        }
    }

    /// Consumes `data`; returns the part-body bytes hashed.
    fn feed(&mut self, mut data: &[u8], hasher: &mut Sha256) -> Result<u64, String> {
        let mut hashed = 0;
        if self.body_left > 0 {
            let k = (self.body_left as usize).min(data.len());
            hasher.update(&data[..k]);
            hashed += k as u64;
            self.body_left -= k as u64;
            data = &data[k..];
            if self.body_left > 0 {
                return Ok(hashed);
            }
        }
        self.pending.extend_from_slice(data);
        if self.finished {
            return Ok(hashed);
        }
        // Expect [CRLF] --boundary ( "--" | CRLF headers CRLF CRLF ).
        let Some(pos) = find(&self.pending, &self.boundary) else {
            return Ok(hashed);
        };
        let after = pos + self.boundary.len();
        if self.pending.len() < after + 2 {
            return Ok(hashed);
        }
        if &self.pending[after..after + 2] == b"--" {
            self.finished = true;
            self.pending.clear();
            return Ok(hashed);
        }
        let Some(hend) = find(&self.pending[after..], b"\r\n\r\n") else {
            return Ok(hashed);
        };
        let headers = String::from_utf8_lossy(&self.pending[after..after + hend]).to_string();
        let cr = headers
            .split("\r\n")
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case("content-range").then(|| v.trim().to_string())
            })
            .ok_or("part without Content-Range")?;
        let (a, b) = cr
            .strip_prefix("bytes ")
            .and_then(|r| r.split('/').next())
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("bad part Content-Range {cr:?}"))?;
        if a != self.next_offset || b < a {
            return Err(format!("part {a}-{b} out of order (expected offset {})", self.next_offset));
        }
        self.next_offset = b + 1;
        self.body_left = b + 1 - a;
        let rest = self.pending.split_off(after + hend + 4);
        self.pending.clear();
        // Feed what followed the part headers (body bytes, maybe further parts).
        Ok(hashed + self.feed(&rest, hasher)?)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
