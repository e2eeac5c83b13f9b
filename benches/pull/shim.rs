//! The throttling shim between every peer and the origin: a TCP proxy on its own tokio runtime that
//! makes the loopback origin look like a registry across a WAN.
//!
//! * Each accepted connection gets its own upstream connection and its own token bucket: responses flow at
//!   most `rate` bytes/s **per connection** (so parallel connections add up, as over a real WAN).
//! * Every request head (parsed from the client→origin direction; bodies skipped by `Content-Length`) is
//!   held back `latency` before it is forwarded: 20 ms before the first byte of every response.
//! * It counts requests by kind (`GET blob`, `GET blob range`, `HEAD manifest`, …), connections, and the
//!   bytes it delivered to the peer (headers included); [`Shim::snapshot`] differences give per-run figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Shared settings and counters.
struct Inner {
    origin: SocketAddr,
    /// Bytes per second per connection; 0 = unlimited.
    rate: AtomicU64,
    latency_us: AtomicU64,
    bytes: AtomicU64,
    conns: AtomicU64,
    /// Nanoseconds since `epoch` of the last byte moved in either direction.
    last_activity: AtomicU64,
    epoch: Instant,
    requests: Mutex<BTreeMap<String, u64>>,
}

/// What went through the shim (cumulative, or a difference of two snapshots).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Bytes delivered to peers (response headers and bodies).
    pub bytes: u64,
    /// Upstream connections opened.
    pub conns: u64,
    /// Requests by kind.
    pub requests: BTreeMap<String, u64>,
}

impl Snapshot {
    /// `self - before`.
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        let mut requests = BTreeMap::new();
        for (k, v) in &self.requests {
            let d = v - before.requests.get(k).copied().unwrap_or(0);
            if d > 0 {
                requests.insert(k.clone(), d);
            }
        }
        Snapshot { bytes: self.bytes - before.bytes, conns: self.conns - before.conns, requests }
    }

    /// All requests.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    /// `GET blob 5, GET blob range 128, …`.
    pub fn summary(&self) -> String {
        if self.requests.is_empty() {
            return "none".into();
        }
        self.requests.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    }
}

/// A running shim (its runtime is shut down on drop).
pub struct Shim {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Shim {
    /// Listens on 127.0.0.1:0 and forwards to `origin`.
    pub fn start(origin: SocketAddr, rate: u64, latency: Duration) -> Shim {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shim")
            .enable_all()
            .build()
            .expect("shim runtime");
        let inner = Arc::new(Inner {
            origin,
            rate: AtomicU64::new(rate),
            latency_us: AtomicU64::new(latency.as_micros() as u64),
            bytes: AtomicU64::new(0),
            conns: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            epoch: Instant::now(),
            requests: Mutex::new(BTreeMap::new()),
        });
        // Bound with std: `Shim::start` is called from inside the bench's own runtime, where `block_on` panics.
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("shim bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("shim addr");
        let inner2 = inner.clone();
        rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).expect("shim listener");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let inner = inner2.clone();
                tokio::spawn(async move {
                    let _ = connection(client, inner).await;
                });
            }
        });
        Shim { addr, inner, rt: Some(rt) }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the per-connection rate in bytes/s (0 = unlimited); applies to data sent from now on.
    pub fn set_rate(&self, rate: u64) {
        self.inner.rate.store(rate, Ordering::Relaxed);
    }

    /// The per-connection rate in bytes/s.
    pub fn rate(&self) -> u64 {
        self.inner.rate.load(Ordering::Relaxed)
    }

    /// Sets the delay before each request is forwarded; applies to requests from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.inner.latency_us.store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// The delay before each request is forwarded.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.inner.latency_us.load(Ordering::Relaxed))
    }

    /// Cumulative counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes: self.inner.bytes.load(Ordering::Relaxed),
            conns: self.inner.conns.load(Ordering::Relaxed),
            requests: self.inner.requests.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Waits until no byte has moved for `quiet` (background fills finishing), at most `max`.
    pub async fn wait_idle(&self, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        while Instant::now() < deadline {
            let last = Duration::from_nanos(self.inner.last_activity.load(Ordering::Relaxed));
            if self.inner.epoch.elapsed().saturating_sub(last) >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    fn touch(&self) {
        self.last_activity.store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

async fn connection(client: TcpStream, inner: Arc<Inner>) -> std::io::Result<()> {
    let upstream = TcpStream::connect(inner.origin).await?;
    inner.conns.fetch_add(1, Ordering::Relaxed);
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let up = tokio::spawn(requests(cr, uw, inner.clone()));
    // The response direction decides when the connection ends (origin closed or client gone).
    let result = responses(ur, cw, inner).await;
    up.abort();
    result
}

/// Client → origin: finds each request head, counts it, holds it back `latency`, forwards it and its body.
async fn requests(mut cr: OwnedReadHalf, mut uw: OwnedWriteHalf, inner: Arc<Inner>) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut body_left: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            if body_left > 0 && !pending.is_empty() {
                let k = (body_left as usize).min(pending.len());
                uw.write_all(&pending[..k]).await?;
                pending.drain(..k);
                body_left -= k as u64;
                continue;
            }
            if body_left > 0 || pending.is_empty() {
                break;
            }
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                if pending.len() > 64 * 1024 {
                    // Not HTTP as we know it: stop parsing, just forward.
                    uw.write_all(&pending).await?;
                    tokio::io::copy(&mut cr, &mut uw).await?;
                    return Ok(());
                }
                break;
            };
            let head: Vec<u8> = pending.drain(..end + 4).collect();
            let info = parse_head(&head);
            *inner.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(info.kind).or_insert(0) += 1;
            let latency = inner.latency_us.load(Ordering::Relaxed);
            if latency > 0 {
                tokio::time::sleep(Duration::from_micros(latency)).await;
            }
            uw.write_all(&head).await?;
            inner.touch();
            if info.chunked {
                uw.write_all(&pending).await?;
                tokio::io::copy(&mut cr, &mut uw).await?;
                return Ok(());
            }
            body_left = info.content_length;
        }
        let n = cr.read(&mut buf).await?;
        if n == 0 {
            let _ = uw.shutdown().await;
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Origin → client, paced to `rate` bytes/s with a virtual clock (at most 2 ms of idle credit).
async fn responses(mut ur: OwnedReadHalf, mut cw: OwnedWriteHalf, inner: Arc<Inner>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut clock = Instant::now();
    loop {
        let n = ur.read(&mut buf).await?;
        if n == 0 {
            let _ = cw.shutdown().await;
            return Ok(());
        }
        let rate = inner.rate.load(Ordering::Relaxed);
        if rate > 0 {
            let now = Instant::now();
            let credit = Duration::from_millis(2);
            if clock + credit < now {
                clock = now - credit;
            }
            clock += Duration::from_secs_f64(n as f64 / rate as f64);
            if clock > now {
                tokio::time::sleep_until(clock.into()).await;
            }
        }
        cw.write_all(&buf[..n]).await?;
        inner.bytes.fetch_add(n as u64, Ordering::Relaxed);
        inner.touch();
    }
}

struct HeadInfo {
    kind: String,
    content_length: u64,
    chunked: bool,
}

/// Method, kind of path, `Range`, `Content-Length` and chunked encoding from a request head.
fn parse_head(head: &[u8]) -> HeadInfo {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("?").to_string();
    let path = first.next().unwrap_or("").split('?').next().unwrap_or("").to_string();
    let (mut content_length, mut chunked, mut range) = (0, false, false);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => content_length = v.parse().unwrap_or(0),
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "range" => range = true,
            _ => {}
        }
    }
    let what = if path == "/v2/" || path == "/v2" {
        "ping"
    } else if path.contains("/blobs/uploads") {
        "upload"
    } else if path.contains("/blobs/") {
        "blob"
    } else if path.contains("/manifests/") {
        "manifest"
    } else {
        "other"
    };
    let kind = format!("{method} {what}{}", if range { " range" } else { "" });
    HeadInfo { kind, content_length, chunked }
}
