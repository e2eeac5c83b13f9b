//! One client connection: optional TLS handshake, HTTP/1.1 or HTTP/2 (detected), the request-head and idle
//! timeouts, and the graceful drain at shutdown.
//!
//! A plain-TCP HTTP/1.1 connection that has been idle for [`PARK_AFTER`] is parked: its HTTP state and
//! buffers (hyper keeps 8 KiB to read and 8 KiB of response head per connection) are dropped, and only the
//! socket waits for the next request, which gets fresh ones. Thousands of idle keep-alive connections then cost
//! little more than their sockets.

use super::Listen;
use super::tls::Acceptor;
use crate::pages::{Delivery, file_region};
use axum::body::Body;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How long an HTTP/1.1 connection waits with nothing in flight before its buffers are released. Long enough
/// that a client sending requests back to back never pays for fresh ones.
const PARK_AFTER: Duration = Duration::from_millis(200);

/// hyper's HTTP/1.1 settings, for both builders below (two types with the same methods, no common trait).
macro_rules! http1_settings {
    ($b:expr, $listen:expr) => {
        // hyper's own header timeout also runs while a keep-alive connection waits for its next request,
        // which would cut idle connections at `header_timeout` and race clients reusing them; `Job` times
        // heads instead.
        $b.timer(TokioTimer::new())
            .header_read_timeout(None)
            // Requests carry no body, so the read buffer bounds the request head (hyper answers 431 beyond it).
            .max_buf_size($listen.max_header_bytes.max(8192))
    };
}

/// The HTTP/1.1 connections of plain TCP, parked between requests.
pub(super) fn http1_builder(listen: &Listen) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    http1_settings!(b, listen);
    b
}

/// The HTTP settings shared by every connection of a listener.
pub(super) fn builder(listen: &Listen) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), listen);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(listen.max_header_bytes.try_into().unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        // Dead peers on long-lived HTTP/2 connections are found by pings.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Everything a connection task needs.
pub(super) struct Job {
    pub app: axum::Router,
    pub builder: Arc<Builder<TokioExecutor>>,
    pub http1: Arc<hyper::server::conn::http1::Builder>,
    pub tls: Option<Acceptor>,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain: watch::Receiver<bool>,
}

impl Job {
    pub async fn serve(self, stream: TcpStream) {
        // Only plain TCP can take sendfile(2); under TLS the same stream carries ciphertext.
        let zero_copy = self.tls.is_none();
        let activity = Arc::new(Activity::new());
        let tracked =
            Tracked { inner: stream, activity: activity.clone(), first_read: true, zero_copy, pending: Bytes::new() };
        // Boxed: a task's future is as large as its largest state (a TLS handshake, a whole HTTP connection),
        // and a parked connection's task should hold little more than its socket.
        match self.tls.clone() {
            None => Box::pin(self.plain(tracked, activity)).await,
            Some(acceptor) => Box::pin(self.tls(acceptor, tracked, activity)).await,
        }
    }

    async fn plain(self, tracked: Tracked, activity: Arc<Activity>) {
        // A connection that sends nothing is closed at whichever limit comes first, as on every path, and at
        // once when the server drains.
        let mut drain = self.drain.clone();
        let first = tokio::select! {
            first = first_bytes(&tracked.inner, self.header_timeout.min(self.idle_timeout)) => first,
            _ = drain.wait_for(|draining| *draining) => FirstBytes::None,
        };
        match first {
            FirstBytes::Http1 => Box::pin(self.http1_parking(tracked, activity)).await,
            FirstBytes::Other => Box::pin(self.http(tracked, activity)).await,
            FirstBytes::None => {}
        }
    }

    async fn tls(self, acceptor: Acceptor, tracked: Tracked, activity: Arc<Activity>) {
        // A handshake that never finishes is a slow-loris too.
        match tokio::time::timeout(self.header_timeout, acceptor.accept(tracked)).await {
            Ok(Ok(tls)) => {
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    activity.h2.store(true, Ordering::Relaxed);
                }
                Box::pin(self.http(tls, activity)).await
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    }

    /// The service every request of the connection goes through.
    fn service(&self, activity: &Arc<Activity>) -> ConnService {
        ConnService { app: self.app.clone(), activity: activity.clone(), zero_copy: self.tls.is_none() }
    }

    /// A plain-TCP HTTP/1.1 connection, parked between requests once idle for [`PARK_AFTER`].
    async fn http1_parking(self, mut io: Tracked, activity: Arc<Activity>) {
        let service = self.service(&activity);
        let mut drain = self.drain.clone();
        loop {
            // Parked: only the socket is held until the next request's first byte.
            while io.pending.is_empty() {
                if *drain.borrow() {
                    return;
                }
                let idle_at = activity.idle_deadline(self.idle_timeout);
                let head_at = activity.head_deadline(self.header_timeout);
                tokio::select! {
                    ready = io.inner.readable() => {
                        if ready.is_err() {
                            return;
                        }
                        break;
                    }
                    changed = drain.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep_until(idle_at) => if activity.is_idle(self.idle_timeout) { return },
                    // The first request's head is timed from the accept, parked or not.
                    () = sleep_until_some(head_at) => return,
                }
            }
            // The next request is arriving: the park clock starts again now, not at the last response.
            activity.touch();
            // On the heap, freed when the connection parks.
            let mut conn = Box::new(self.http1.serve_connection(TokioIo::new(io), service.clone()));
            let mut parking = false;
            let mut closing = false;
            // A check that finds the connection busy (a request waiting on a slow upstream) is not repeated
            // before this, or the loop would spin on a deadline already past.
            let mut next_check = Instant::now();
            loop {
                let idle_at = activity.idle_deadline(self.idle_timeout).max(next_check);
                let park_at = activity.idle_deadline(PARK_AFTER).max(next_check);
                let head_at = activity.head_deadline(self.header_timeout);
                tokio::select! {
                    // Polled as a future (which flushes what hyper holds before shutting the socket down)
                    // unless parking: then hyper is idle with nothing left to write, and the socket is kept.
                    res = std::future::poll_fn(|cx| {
                        if parking { conn.poll_without_shutdown(cx) } else { Pin::new(&mut *conn).poll(cx) }
                    }) => {
                        match res {
                            Ok(()) if parking => break,
                            Ok(()) => {}
                            Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
                        }
                        return;
                    }
                    changed = drain.changed(), if !closing && !parking => {
                        if changed.is_err() || *drain.borrow() {
                            closing = true;
                            Pin::new(&mut *conn).graceful_shutdown();
                        }
                    }
                    () = tokio::time::sleep_until(park_at), if !closing && !parking => {
                        if activity.is_parkable(PARK_AFTER) {
                            // Nothing read of a next request and nothing left to write: hyper closes at once,
                            // without touching the socket (polled without shutdown).
                            parking = true;
                            Pin::new(&mut *conn).graceful_shutdown();
                        } else {
                            next_check = Instant::now() + PARK_AFTER;
                        }
                    }
                    () = tokio::time::sleep_until(idle_at), if !closing && !parking => {
                        if activity.is_idle(self.idle_timeout) {
                            closing = true;
                            Pin::new(&mut *conn).graceful_shutdown();
                        } else {
                            next_check = Instant::now() + PARK_AFTER;
                        }
                    }
                    () = sleep_until_some(head_at) => {
                        if activity.head_overdue(self.header_timeout) {
                            tracing::debug!("request head not received in time; closing the connection");
                            return;
                        }
                    }
                    () = activity.head_started.notified() => {}
                }
            }
            let parts = (*conn).into_parts();
            tracing::debug!("idle connection parked; its HTTP buffers released");
            io = parts.io.into_inner();
            // Bytes hyper read past its last request go to the next one, before any it had not read yet.
            if !parts.read_buf.is_empty() {
                let mut pending = bytes::BytesMut::from(parts.read_buf);
                pending.extend_from_slice(&io.pending);
                io.pending = pending.freeze();
            }
        }
    }

    async fn http<I>(self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = self.service(&activity);
        let conn = self.builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        let mut drain = self.drain;
        let mut closing = false;
        // See `http1_parking`: a busy connection is not checked again at once.
        let mut next_check = Instant::now();
        loop {
            let idle_at = activity.idle_deadline(self.idle_timeout).max(next_check);
            let head_at = activity.head_deadline(self.header_timeout);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                changed = drain.changed(), if !closing => {
                    if changed.is_err() || *drain.borrow() {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                () = tokio::time::sleep_until(idle_at), if !closing => {
                    if activity.is_idle(self.idle_timeout) {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        next_check = Instant::now() + PARK_AFTER;
                    }
                }
                () = sleep_until_some(head_at) => {
                    if activity.head_overdue(self.header_timeout) {
                        // A request head that does not arrive in time: close without an answer.
                        tracing::debug!("request head not received in time; closing the connection");
                        return;
                    }
                }
                // The first byte of a head arrived after the deadlines above were taken: take them again,
                // or a trickled head would only be looked at when the idle timeout fires.
                () = activity.head_started.notified() => {}
            }
        }
    }
}

/// The response future of [`ConnService`].
type ResponseFuture =
    Pin<Box<dyn std::future::Future<Output = Result<hyper::Response<Body>, std::convert::Infallible>> + Send>>;

/// The app, with the connection's activity counted around each exchange.
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    activity: Arc<Activity>,
    zero_copy: bool,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnService {
    type Response = hyper::Response<Body>;
    type Error = std::convert::Infallible;
    // Boxed: a parked connection is taken apart between requests, which needs an `Unpin` future.
    type Future = ResponseFuture;

    fn call(&self, req: hyper::Request<Incoming>) -> ResponseFuture {
        let exchange = Exchange::new(self.activity.clone());
        let in_flight = InFlight::new(self.activity.clone());
        let mut req = req.map(Body::new);
        if self.zero_copy {
            req.extensions_mut().insert(Delivery::SendFile);
        }
        let call = tower::ServiceExt::oneshot(self.app.clone(), req);
        Box::pin(async move {
            let resp = call.await;
            drop(in_flight);
            resp.map(|resp| resp.map(|body| Body::new(Sending { body, _exchange: exchange })))
        })
    }
}

/// What a plain-TCP connection's first bytes say.
enum FirstBytes {
    /// An HTTP/1.1 request (anything that cannot be the HTTP/2 preface).
    Http1,
    /// The HTTP/2 preface, or too few bytes to tell: the detecting path.
    Other,
    /// Closed, or nothing within the head timeout.
    None,
}

/// Peeks at the first bytes (leaving them for whoever reads next) to choose the connection's path.
async fn first_bytes(stream: &TcpStream, within: Duration) -> FirstBytes {
    let mut buf = [0u8; 3];
    let peeked = tokio::time::timeout(within, stream.peek(&mut buf)).await;
    match peeked {
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => FirstBytes::None,
        Ok(Ok(n)) if H2_PREFACE.starts_with(&buf[..n]) => FirstBytes::Other,
        Ok(Ok(_)) => FirstBytes::Http1,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the connection last moved bytes, how many requests it is answering, and since when a request head
/// has been arriving.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Requests whose response head is not ready yet.
    in_flight: AtomicUsize,
    /// Requests whose response has not gone out in full (a superset of `in_flight`).
    exchanges: AtomicUsize,
    /// Bytes arrived while a response was going out (a pipelined request): its head is timed from the end of
    /// that response, since HTTP/1.1 answers in order and the client cannot be faster than that.
    early_bytes: AtomicBool,
    /// Milliseconds since `start` plus one when the first byte of a request head arrived; 0 while none is.
    head_since: AtomicU64,
    /// Signalled when `head_since` is set, so the connection loop arms the head deadline.
    head_started: Notify,
    /// HTTP/2 multiplexes and pings: there is no "between requests", so heads are not timed.
    h2: AtomicBool,
    /// The socket refused the last write: hyper still holds bytes to send.
    write_blocked: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            exchanges: AtomicUsize::new(0),
            early_bytes: AtomicBool::new(false),
            // The first request's head is timed from the accept: a connection that never sends a byte would
            // otherwise hold its slot for the whole idle timeout.
            head_since: AtomicU64::new(1),
            head_started: Notify::new(),
            h2: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    /// Bytes arrived: while no request is being answered, they are the start of the next request head.
    fn read(&self) {
        self.touch();
        if self.h2.load(Ordering::Relaxed) {
            return;
        }
        if self.exchanges.load(Ordering::SeqCst) == 0 {
            self.start_head();
        } else if self.in_flight.load(Ordering::SeqCst) == 0 {
            // Only once the response head is out: before, bytes may be the request's own body (an admin POST).
            self.early_bytes.store(true, Ordering::SeqCst);
        }
    }
    fn start_head(&self) {
        if self.head_since.compare_exchange(0, self.now_ms() + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            // A stored permit if the loop is not waiting yet: the wake-up cannot be lost.
            self.head_started.notify_one();
        }
    }
    fn head_deadline(&self, limit: Duration) -> Option<Instant> {
        match self.head_since.load(Ordering::Relaxed) {
            _ if self.h2.load(Ordering::Relaxed) => None,
            // A request being answered is never cut by the head clock (its deadline is the request timeout).
            _ if self.exchanges.load(Ordering::SeqCst) > 0 => None,
            0 => None,
            since => Some(self.start + Duration::from_millis(since - 1) + limit),
        }
    }
    /// Whether a request head has been arriving for longer than `limit`.
    fn head_overdue(&self, limit: Duration) -> bool {
        self.head_deadline(limit).is_some_and(|at| at <= Instant::now())
    }
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
    /// Idle: nothing in flight (a response waiting on a slow upstream is not idle) and no bytes for `idle`.
    fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && Instant::now() >= self.idle_deadline(idle)
    }
    /// Parkable: idle for `after`, every response handed over and written to the socket, and no request
    /// head under way.
    fn is_parkable(&self, after: Duration) -> bool {
        self.is_idle(after)
            && self.exchanges.load(Ordering::SeqCst) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.write_blocked.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight until its response head is ready (then its body's bytes are activity).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        // The head is complete: hyper hands over a request only then. Bytes that came early were (the start
        // of) this request: the end of an earlier response must not start a head clock for them.
        a.head_since.store(0, Ordering::Relaxed);
        a.early_bytes.store(false, Ordering::SeqCst);
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request from its dispatch until its response body is done (or dropped): bytes that arrive
/// meanwhile do not start a head deadline, which would otherwise cut a long download under a pipelined
/// request.
struct Exchange(Arc<Activity>);

impl Exchange {
    fn new(a: Arc<Activity>) -> Self {
        a.exchanges.fetch_add(1, Ordering::SeqCst);
        Exchange(a)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let a = &self.0;
        if a.exchanges.fetch_sub(1, Ordering::SeqCst) == 1 && a.early_bytes.swap(false, Ordering::SeqCst) {
            // What arrived during the response is the next head, whole or in part: time it from now. A whole
            // one is dispatched next, which clears the deadline again.
            a.start_head();
        }
    }
}

/// A response body that holds its request's [`Exchange`] until the last frame went out.
struct Sending {
    body: Body,
    _exchange: Exchange,
}

impl hyper::body::Body for Sending {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The client's TCP stream: records activity whenever bytes move, and sends blob body chunks (mapped blob
/// files, see [`file_region`]) with `sendfile(2)`, so their bytes never pass through a userspace copy.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// Plain-text HTTP/2 (prior knowledge) shows itself in the first bytes.
    first_read: bool,
    zero_copy: bool,
    /// Bytes read before the connection was parked, read again first.
    pending: Bytes,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending.split_to(n));
            self.activity.read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if std::mem::take(&mut self.first_read) && buf.filled()[before..].starts_with(H2_PREFACE) {
                self.activity.h2.store(true, Ordering::Relaxed);
            }
            self.activity.read();
        }
        res
    }
}

impl Tracked {
    fn wrote(&self, res: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &res {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.touch();
                self.activity.write_blocked.store(false, Ordering::Relaxed);
            }
            Poll::Pending => self.activity.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
        res
    }

    /// Sends `len` bytes of `file` from `offset` when the socket takes them.
    fn poll_sendfile(&self, cx: &mut Context<'_>, file: &File, offset: u64, len: usize) -> Poll<io::Result<usize>> {
        let (socket, source) = (self.inner.as_raw_fd(), file.as_raw_fd());
        loop {
            std::task::ready!(self.inner.poll_write_ready(cx))?;
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
                // SAFETY: both descriptors are open for the call (the stream and an Arc'd file); the kernel
                // reads the file at `off` and writes to the socket, touching no memory of ours but `off`.
                let n = unsafe { libc::sendfile(socket, source, &mut off, len) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }
}

/// A file system or socket that cannot take `sendfile(2)`: the connection falls back to plain writes (nothing
/// was sent, so the same bytes go out that way).
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.zero_copy
            && let Some((file, offset)) = file_region(data)
        {
            match this.poll_sendfile(cx, &file, offset, data.len()) {
                Poll::Ready(Err(e)) if unsupported(&e) => this.zero_copy = false,
                res => return this.wrote(res),
            }
        }
        let res = Pin::new(&mut this.inner).poll_write(cx, data);
        this.wrote(res)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut bufs = bufs;
        if this.zero_copy {
            // hyper queues the response head and body chunks as separate buffers: a leading mapped chunk goes
            // out with sendfile; otherwise only the buffers before the first mapped chunk are written, so the
            // next call starts with it.
            if let Some((file, offset)) = bufs.first().and_then(|b| file_region(b)) {
                match this.poll_sendfile(cx, &file, offset, bufs[0].len()) {
                    Poll::Ready(Err(e)) if unsupported(&e) => this.zero_copy = false,
                    res => return this.wrote(res),
                }
            } else if let Some(k) = bufs.iter().position(|b| file_region(b).is_some()) {
                bufs = &bufs[..k];
            }
        }
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(res)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_sent_before_the_last_response_ended_leaves_no_head_clock() {
        let a = Arc::new(Activity::new());
        let limit = Duration::from_secs(1);
        // Request 1 is answered; its body is still going out when the client's next request arrives.
        let first = Exchange::new(a.clone());
        drop(InFlight::new(a.clone()));
        a.read();
        // hyper dispatches request 2 before it drops request 1's body.
        let second = Exchange::new(a.clone());
        let in_flight = InFlight::new(a.clone());
        drop(first);
        assert_eq!(a.head_deadline(limit), None, "a request being answered was timed as a head");
        drop(in_flight);
        drop(second);
        assert_eq!(a.head_deadline(limit), None, "the early bytes were request 2's: no head is pending");
        // Bytes after that are the next head.
        a.read();
        assert!(a.head_deadline(limit).is_some());
    }
}
