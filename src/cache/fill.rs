//! One download into a temporary file, hashed as it lands, with progress published to every reader. A fill
//! belongs to the cache, not to the request that started it: it runs to the end even if that client leaves.
//!
//! Its bytes come from its origins in turn (the peers that own the blob, then the registry; see
//! [`super::origin`]): when one stops part way, the next resumes at that offset and the hash goes on.
//! From the registry's first byte, large blobs are fetched as several concurrent range requests written at
//! their offsets (many upstreams and CDNs limit each connection's rate); readers see only the contiguous
//! prefix, and the digest is computed over that prefix as it grows. An upstream that ignores ranges is
//! streamed in one piece.

use super::Error;
use super::origin::{Origin, OriginError, Origins};
use super::ramp::Ramp;
use super::store::{BlobStore, TempFile};
use crate::oci::{Digest, RepoName, Verifier};
use crate::pages::map_chunk;
use crate::upstream::{self, RegistryClient};
use bytes::Bytes;
use futures_util::StreamExt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Bytes mapped at a time to hash the file's prefix (resident while mapped, so kept small).
const HASH_PIECE: u64 = 2 * 1024 * 1024;

/// Where a fill is. Readers watch this to know how far they may read.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for the upstream's answer.
    Starting,
    /// Bytes `0..written` are in the file; `total` is the announced size.
    Streaming {
        /// Length of the contiguous prefix written so far.
        written: u64,
        /// The upstream's announced size.
        total: Option<u64>,
    },
    /// Verified and committed; `size` bytes.
    Done {
        /// Final size.
        size: u64,
    },
    /// Failed: the file is gone or will be, and readers must fail too.
    Failed(Arc<Error>),
    /// Caching was abandoned (the disk filled up): readers fetch the rest from the upstream themselves.
    Uncached {
        /// The upstream's announced size.
        total: Option<u64>,
    },
}

/// How to fetch large blobs: range requests of `chunk_size` bytes, at most `concurrency` at a time, ramped
/// up from one while more pay ([`Ramp`]; 1: one stream).
#[derive(Debug, Clone, Copy)]
pub struct FillPlan {
    /// Bytes per range request.
    pub chunk_size: u64,
    /// Range requests in flight per blob.
    pub concurrency: usize,
}

/// The free space fills leave for the metadata database. Checked on the writer's blocking thread every so
/// many bytes, not per chunk: a `statvfs` per chunk would cost more than the write on some filesystems.
#[derive(Debug, Clone)]
pub struct Reserve {
    store: BlobStore,
    min_free: u64,
}

impl Reserve {
    /// Keep `min_free` bytes free (at most a tenth of the filesystem) on `store`'s filesystem; 0: no reserve.
    pub fn new(store: BlobStore, min_free: u64) -> Reserve {
        Reserve { store, min_free }
    }

    /// `StorageFull` when writing until the next check could reach into the reserve; else how many bytes may
    /// be written before that check. Blocking.
    fn check(&self) -> std::io::Result<u64> {
        if self.min_free == 0 {
            return Ok(u64::MAX);
        }
        // A filesystem that cannot report its space is no reason to fail a fill; ENOSPC still ends it.
        let Ok((free, reserve)) = self.store.free_and_reserve(self.min_free) else { return Ok(MAX_CHECK_EVERY) };
        // A quarter of the reserve between checks, and no check lets a writer reach into the reserve before
        // the next one: a few writers at once only dent it.
        let every = (reserve / 4).clamp(MIN_CHECK_EVERY, MAX_CHECK_EVERY);
        if free < reserve + every {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("{free} bytes free, too close to the {reserve} bytes kept for metadata (cache.min_free_bytes)"),
            ));
        }
        Ok(every)
    }
}

/// Batches queued for a fill's writer thread, and the most bytes in a batch: the bound on its buffered
/// bytes (4 MiB).
const QUEUED: usize = 16;
const BATCH: usize = 256 * 1024;
/// How long received bytes may wait for more before they go to the writer as a smaller batch.
const BATCH_DELAY: Duration = Duration::from_millis(2);
/// At most this many bytes are written before readers hear of them while more are queued (see [`write_at`]).
const PUBLISH_EVERY: u64 = 1024 * 1024;

/// Bounds on the bytes a fill writes between two free-space checks.
const MIN_CHECK_EVERY: u64 = 256 * 1024;
const MAX_CHECK_EVERY: u64 = 8 * 1024 * 1024;

/// A running fill, shared by every request for its digest.
#[derive(Debug)]
pub struct Fill {
    /// The blob being filled.
    pub digest: Digest,
    /// The temporary file; an open descriptor stays valid across the rename at commit.
    pub file: Arc<File>,
    state: watch::Sender<FillState>,
    /// Where the blob comes from, so readers can go there directly if caching is abandoned.
    origin: OnceLock<(Arc<RegistryClient>, RepoName)>,
    /// Set when the cache refused the blob before its first byte (it can never fit).
    refused: AtomicBool,
    /// Set while the bytes come from a peer (see [`Fill::via_peer`]).
    via_peer: AtomicBool,
    /// Set when bytes from a peer or the bucket failed verification (see [`Fill::source_corrupt`]).
    source_corrupt: AtomicBool,
    /// `Some(true)` once the registry was asked (see [`Fill::goes_to_registry`]), `Some(false)` if the fill
    /// ended without it: what an upload to the bucket waits for, without waking on every byte.
    from_registry: watch::Sender<Option<bool>>,
    /// When the fill started, and (in milliseconds after that) when its source last sent bytes.
    started: Instant,
    touched_ms: AtomicU64,
}

/// What a fill has received so far, carried from one source to the next: the contiguous prefix written,
/// the hash over it, the size the first source announced, and the peers that sent bytes.
struct Resume {
    written: Arc<AtomicU64>,
    verifier: Arc<Mutex<Verifier>>,
    total: Option<u64>,
    senders: Vec<String>,
    /// Whether the bucket sent bytes.
    from_bucket: bool,
}

/// What one attempt at an origin came to.
enum Step {
    /// Verified: the size.
    Done(u64),
    /// The cache refused the blob (it can never fit).
    Refused,
    /// Try the next source, from where this one stopped.
    Next,
}

/// What the range requests of one fill report to its [`Ramp`].
#[derive(Debug, Default)]
struct RangeStats {
    /// Bytes received across the requests.
    received: AtomicU64,
    /// Requests sent that have not had their first byte yet.
    waiting: AtomicUsize,
    /// The slowest first byte so far, in microseconds (sets how long the ramp measures).
    slowest_first_byte_us: AtomicU64,
}

/// One request waiting for its first byte, counted in [`RangeStats::waiting`] until it arrives or the
/// request ends.
struct FirstByte {
    stats: Arc<RangeStats>,
    sent: Instant,
    arrived: bool,
}

impl FirstByte {
    fn new(stats: &Arc<RangeStats>) -> FirstByte {
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        FirstByte { stats: stats.clone(), sent: Instant::now(), arrived: false }
    }

    fn arrived(&mut self) {
        if !self.arrived {
            self.arrived = true;
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            let us = self.sent.elapsed().as_micros() as u64;
            self.stats.slowest_first_byte_us.fetch_max(us, Ordering::Relaxed);
        }
    }
}

impl Drop for FirstByte {
    fn drop(&mut self) {
        if !self.arrived {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Per-chunk byte counts and the contiguous prefix they add up to.
struct Progress {
    chunk_size: u64,
    total: u64,
    written: Vec<u64>,
    prefix: u64,
}

impl Progress {
    fn chunk_len(&self, i: usize) -> u64 {
        (self.total - i as u64 * self.chunk_size).min(self.chunk_size)
    }

    /// Records `n` more bytes in chunk `i`; returns the new prefix if it moved.
    fn add(&mut self, i: usize, n: u64) -> Option<u64> {
        self.written[i] += n;
        let before = self.prefix;
        let mut k = (self.prefix / self.chunk_size) as usize;
        while k < self.written.len() && self.written[k] == self.chunk_len(k) {
            k += 1;
        }
        self.prefix = if k < self.written.len() { k as u64 * self.chunk_size + self.written[k] } else { self.total };
        (self.prefix != before).then_some(self.prefix)
    }
}

impl Fill {
    /// A fill in the `Starting` state.
    pub fn new(digest: Digest, file: Arc<File>) -> Self {
        Fill {
            digest,
            file,
            state: watch::Sender::new(FillState::Starting),
            origin: OnceLock::new(),
            refused: AtomicBool::new(false),
            via_peer: AtomicBool::new(false),
            source_corrupt: AtomicBool::new(false),
            from_registry: watch::Sender::new(None),
            started: Instant::now(),
            touched_ms: AtomicU64::new(0),
        }
    }

    /// Whether the bytes come from a peer right now. A peer's request for this blob is then refused (the
    /// two nodes' views disagree, and serving it could have each wait on the other).
    pub fn via_peer(&self) -> bool {
        self.via_peer.load(Ordering::Relaxed)
    }

    /// Whether the fill failed because bytes from a peer or the bucket did not verify (the blob is worth
    /// fetching again from the upstream at once).
    pub fn source_corrupt(&self) -> bool {
        self.source_corrupt.load(Ordering::Relaxed)
    }

    /// Waits until the fill either asks the registry (true) or ends without it (false).
    pub async fn goes_to_registry(&self) -> bool {
        let mut rx = self.from_registry.subscribe();
        rx.wait_for(Option::is_some).await.map(|r| *r == Some(true)).unwrap_or(false)
    }

    /// Records that the fill ended; an upload still waiting to learn whether it is needed stops waiting.
    fn ended(&self) {
        self.from_registry.send_if_modified(|r| {
            let undecided = r.is_none();
            if undecided {
                *r = Some(false);
            }
            undecided
        });
    }

    /// The fill's progress as an upload following it sees it: the final prefix as it grows, then whether
    /// the blob was verified. Changes in between are coalesced, so a slow follower never holds any back.
    pub fn progress(&self) -> impl futures_util::Stream<Item = crate::bucket::Progress> + Unpin + Send + 'static {
        use crate::bucket::Progress;
        let mut rx = self.subscribe();
        rx.mark_changed();
        futures_util::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            loop {
                rx.changed().await.ok()?;
                let now = match &*rx.borrow_and_update() {
                    FillState::Starting => continue,
                    FillState::Streaming { written, .. } => Progress::Written(*written),
                    FillState::Done { size } => return Some((Progress::Verified(*size), None)),
                    FillState::Failed(_) | FillState::Uncached { .. } => return Some((Progress::Failed, None)),
                };
                return Some((now, Some(rx)));
            }
        })
        .boxed()
    }

    /// Milliseconds since the source last sent bytes (since the start, before the first byte).
    pub fn stalled_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).saturating_sub(self.touched_ms.load(Ordering::Relaxed))
    }

    /// The state now.
    pub fn state(&self) -> FillState {
        self.state.borrow().clone()
    }

    /// Records where the blob comes from (before the fill starts).
    pub fn set_origin(&self, client: Arc<RegistryClient>, repo: RepoName) {
        let _ = self.origin.set((client, repo));
    }

    /// The registry and repository the blob comes from.
    pub fn origin(&self) -> Option<&(Arc<RegistryClient>, RepoName)> {
        self.origin.get()
    }

    /// Gives up caching: every reader continues straight from the upstream.
    pub fn uncache(&self) {
        self.ended();
        self.state.send_modify(|s| {
            let total = match s {
                FillState::Streaming { total, .. } => *total,
                _ => None,
            };
            *s = FillState::Uncached { total };
        });
    }

    /// Gives up caching before the first byte because the blob can never fit: readers stream it from the
    /// upstream, and nothing is written.
    pub fn refuse(&self) {
        self.refused.store(true, Ordering::Relaxed);
        self.uncache();
    }

    /// Whether the cache refused the blob as too large (see [`Fill::refuse`]).
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// Waits until the size is known (or the fill failed): what a response needs before its headers.
    pub async fn wait_started(&self) -> Result<Option<u64>, Arc<Error>> {
        let mut rx = self.subscribe();
        let state = rx.wait_for(|s| !matches!(s, FillState::Starting)).await.map(|s| s.clone());
        match state {
            Ok(FillState::Streaming { total, .. }) => Ok(total),
            Ok(FillState::Done { size }) => Ok(Some(size)),
            Ok(FillState::Failed(e)) => Err(e),
            Ok(FillState::Uncached { total }) => Ok(total),
            Ok(FillState::Starting) | Err(_) => unreachable!("wait_for returned a Starting state"),
        }
    }

    /// Waits for the end: the committed size, or the error.
    pub async fn wait_done(&self) -> Result<u64, Arc<Error>> {
        let mut rx = self.subscribe();
        let ended =
            |s: &FillState| matches!(s, FillState::Done { .. } | FillState::Failed(_) | FillState::Uncached { .. });
        let state = rx.wait_for(ended).await.map(|s| s.clone());
        match state {
            Ok(FillState::Done { size }) => Ok(size),
            Ok(FillState::Failed(e)) => Err(e),
            Ok(FillState::Uncached { .. }) => Err(Arc::new(Error::Io(std::io::ErrorKind::StorageFull.into()))),
            _ => unreachable!("wait_for returned an unfinished state"),
        }
    }

    /// Publishes a failure to every reader.
    pub fn fail(&self, error: Error) {
        self.ended();
        self.state.send_replace(FillState::Failed(Arc::new(error)));
    }

    #[cfg(test)]
    pub(crate) fn state_for_test(&self, state: FillState) {
        self.state.send_replace(state);
    }

    /// Publishes the committed size.
    pub fn done(&self, size: u64) {
        self.ended();
        self.state.send_replace(FillState::Done { size });
    }

    /// Tells readers that the first `prefix` bytes are in the file. Only ever raises the mark: range writers
    /// publish after releasing the progress lock, so an older, smaller prefix can arrive after a newer one.
    fn publish_prefix(&self, prefix: u64) {
        self.touched_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.state.send_if_modified(|s| match s {
            FillState::Streaming { written, .. } if *written < prefix => {
                *written = prefix;
                true
            }
            _ => false,
        });
    }

    /// Downloads the blob into `temp` and checks size and digest, from each origin in turn (the owner peers,
    /// then the registry), each resuming where the previous one stopped with the hash state kept. Returns
    /// the size, or `None` when `admit`, asked with the announced size before the first byte is written,
    /// said no.
    pub async fn download<F: std::future::Future<Output = bool>>(
        self: &Arc<Self>,
        temp: &TempFile,
        origins: &Origins,
        plan: FillPlan,
        reserve: &Reserve,
        admit: impl FnOnce(Option<u64>) -> F,
        slots: &tokio::sync::Semaphore,
    ) -> Result<Option<u64>, Error> {
        let mut admit = Some(admit);
        let mut resume = Resume {
            written: Arc::default(),
            verifier: Arc::new(Mutex::new(Verifier::new(self.digest.algorithm()))),
            total: None,
            senders: Vec::new(),
            from_bucket: false,
        };
        let mut _slot = None;
        for origin in origins.sequence() {
            self.via_peer.store(matches!(origin, Origin::Peer(_)), Ordering::Relaxed);
            if matches!(origin, Origin::Registry) {
                self.from_registry.send_replace(Some(true));
                // Queued, not failed: waiting clients see the fill go on when a slot frees (or their deadline
                // passes).
                _slot = Some(slots.acquire().await.expect("the fill semaphore is never closed"));
            }
            match self.try_origin(temp, origins, origin, plan, &mut resume, reserve, &mut admit).await {
                Ok(Step::Done(size)) => return Ok(Some(size)),
                Ok(Step::Refused) => return Ok(None),
                Ok(Step::Next) => {}
                Err(e) => {
                    self.blame_senders(origins, &resume, &e);
                    return Err(e);
                }
            }
        }
        unreachable!("the registry, the last origin, never says to try the next one")
    }

    /// One attempt at `origin`, from where the previous one stopped. From the first byte, the registry and
    /// the bucket are asked for several ranges at once (many upstreams, CDNs and object stores limit each
    /// connection's rate); a peer sends its growing file in one stream.
    #[allow(clippy::too_many_arguments)]
    async fn try_origin<F: std::future::Future<Output = bool>>(
        self: &Arc<Self>,
        temp: &TempFile,
        origins: &Origins,
        origin: Origin<'_>,
        plan: FillPlan,
        resume: &mut Resume,
        reserve: &Reserve,
        admit: &mut Option<impl FnOnce(Option<u64>) -> F>,
    ) -> Result<Step, Error> {
        let from = resume.written.load(Ordering::Relaxed);
        if from > 0 && resume.total == Some(from) {
            // Every byte landed before the last source failed: nothing to ask for, only to verify.
            return self.finish(resume, from).map(Step::Done);
        }
        let peer = match origin {
            Origin::Peer(p) => Some((p, origins.cluster.as_ref().expect("peer origins come with a cluster"))),
            Origin::Registry | Origin::Bucket => None,
        };
        let next = |reason: &'static str, suspect: bool| -> Result<Step, Error> {
            match (origin, peer) {
                (Origin::Registry, _) => {
                    Err(upstream::Error::Protocol(format!("the upstream's transfer failed: {reason}")).into())
                }
                (_, Some((p, cluster))) => {
                    cluster.count_fallback(reason);
                    if suspect {
                        cluster.suspect(p, reason);
                    }
                    Ok(Step::Next)
                }
                (_, None) => Ok(Step::Next),
            }
        };
        let parallel = from == 0 && !matches!(origin, Origin::Peer(_)) && plan.concurrency > 1 && plan.chunk_size > 0;
        let end = parallel.then(|| plan.chunk_size - 1);
        let (announced, opened) = match origins.open(origin, &self.digest, from, end, resume.total).await {
            Ok(answer) => answer,
            Err(OriginError::Next { reason, suspect }) => return next(reason, suspect),
            Err(OriginError::Fail(e)) => return Err(e.into()),
        };
        if let (Some(known), Some(now)) = (resume.total, announced)
            && known != now
        {
            return next("protocol", true);
        }
        if resume.total.is_none() {
            resume.total = announced;
            self.state.send_replace(FillState::Streaming { written: from, total: announced });
        }
        if let Some(admit) = admit.take()
            && !admit(announced).await
        {
            return Ok(Step::Refused);
        }
        if let Some((p, _)) = peer {
            resume.senders.push(p.to_owned());
        }
        resume.from_bucket |= matches!(origin, Origin::Bucket);
        if opened.end < opened.total {
            // Only the first range came: the rest in ranges, several at once.
            return self.download_ranges(temp, origins, origin, opened, plan, resume, reserve).await;
        }
        let counted = peer.map(|(_, c)| c);
        let result = self.write_resumable(temp, resume, opened.total, opened.body, reserve, counted).await;
        let got = resume.written.load(Ordering::Relaxed) - from;
        if matches!(origin, Origin::Registry) {
            origins.registry.count_fetched(got);
        }
        let total = resume.total.unwrap_or(from + got);
        match result {
            Ok(()) if from + got == total => {}
            Ok(()) if !matches!(origin, Origin::Registry) => return next("short", false),
            Ok(()) => return Err(Error::SizeMismatch { announced: total, received: from + got }),
            Err(Error::Upstream(e)) => {
                let stalled = opened.stalled.load(Ordering::Relaxed);
                tracing::warn!(?origin, digest = %self.digest, error = %e, at = from + got, "transfer broke; resuming from the next source");
                return if matches!(origin, Origin::Registry) {
                    Err(e.into())
                } else {
                    next(if stalled { "stalled" } else { "broken" }, true)
                };
            }
            Err(Error::SizeMismatch { .. }) if !matches!(origin, Origin::Registry) => return next("protocol", true),
            Err(e) => return Err(e),
        }
        self.finish(resume, total).map(Step::Done)
    }

    /// After a failed verification: the peers that sent bytes are skipped, a bucket object that did is not
    /// read again, and each is counted as corrupt; the fill is marked for a refetch from the upstream.
    fn blame_senders(&self, origins: &Origins, resume: &Resume, e: &Error) {
        if !matches!(e, Error::DigestMismatch { .. }) {
            return;
        }
        if let (Some(cluster), false) = (&origins.cluster, resume.senders.is_empty()) {
            self.source_corrupt.store(true, Ordering::Relaxed);
            for sender in &resume.senders {
                cluster.suspect(sender, "sent bytes that failed verification");
            }
            cluster.count_corrupt();
            tracing::error!(digest = %self.digest, peers = ?resume.senders, error = %e, "bytes from a peer failed verification; nothing committed");
        }
        if let (Some(bucket), true) = (&origins.bucket, resume.from_bucket) {
            self.source_corrupt.store(true, Ordering::Relaxed);
            bucket.mark_corrupt(&self.digest);
        }
    }

    /// Writes `body` at the resume point, hashing and publishing as it goes; `resume` keeps what landed
    /// even when the body breaks. Bytes from a peer are counted as they land (`peer`).
    async fn write_resumable(
        self: &Arc<Self>,
        temp: &TempFile,
        resume: &Resume,
        total: u64,
        body: futures_util::stream::BoxStream<'static, Result<Bytes, upstream::Error>>,
        reserve: &Reserve,
        peer: Option<&crate::cluster::Cluster>,
    ) -> Result<(), Error> {
        let from = resume.written.load(Ordering::Relaxed);
        let (me, v, w, peer) = (self.clone(), resume.verifier.clone(), resume.written.clone(), peer.cloned());
        write_at(&temp.file, from, Some(total - from), reserve, body, move |bytes, written, publish| {
            if let Some(cluster) = &peer {
                cluster.count_bytes("in", bytes.len() as u64);
            }
            v.lock().unwrap().update(bytes);
            w.store(from + written, Ordering::Relaxed);
            if publish {
                me.publish_prefix(from + written);
            }
        })
        .await
        .map(drop)
    }

    fn finish(&self, resume: &Resume, size: u64) -> Result<u64, Error> {
        let verifier = std::mem::replace(&mut *resume.verifier.lock().unwrap(), Verifier::new(self.digest.algorithm()));
        self.check(verifier.finish(), size)
    }

    /// The rest of a blob whose first range `first` holds, as concurrent range requests to `origin` written
    /// at their offsets, while a hasher follows the contiguous prefix. If the bucket fails part way, what is
    /// contiguous and hashed is kept and the next origin resumes there; the registry's failure is the answer.
    #[allow(clippy::too_many_arguments)]
    async fn download_ranges(
        self: &Arc<Self>,
        temp: &TempFile,
        origins: &Origins,
        origin: Origin<'_>,
        first: super::origin::Opened,
        plan: FillPlan,
        resume: &Resume,
        reserve: &Reserve,
    ) -> Result<Step, Error> {
        let total = first.total;
        let chunks = total.div_ceil(plan.chunk_size) as usize;
        let progress =
            Arc::new(Mutex::new(Progress { chunk_size: plan.chunk_size, total, written: vec![0; chunks], prefix: 0 }));
        let stats = Arc::new(RangeStats::default());
        let mut first = Some(first.body);
        let fetches = async {
            let mut ramp = Ramp::new(plan.concurrency, Instant::now());
            let mut running = futures_util::stream::FuturesUnordered::new();
            let mut next = 0;
            let mut tick = tokio::time::interval(super::ramp::MIN_WINDOW / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                while running.len() < ramp.limit() && next < chunks {
                    let body = if next == 0 { first.take() } else { None };
                    running.push(self.fetch_chunk(temp, origins, origin, next, body, &progress, reserve, &stats));
                    next += 1;
                }
                tokio::select! {
                    done = running.next() => match done {
                        Some(result) => result?,
                        None => return Ok::<_, Error>(ramp),
                    },
                    _ = tick.tick() => {
                        let slowest = Duration::from_micros(stats.slowest_first_byte_us.load(Ordering::Relaxed));
                        let under_way = stats.waiting.load(Ordering::Relaxed) == 0;
                        let received = stats.received.load(Ordering::Relaxed);
                        ramp.observe(Instant::now(), received, under_way, running.len() >= ramp.limit(), slowest * 4);
                    }
                }
            }
        };
        // try_join: a chunk that fails for good ends the attempt at once instead of leaving the hasher waiting.
        let fetched = futures_util::future::try_join(fetches, self.hash_prefix(total, resume)).await;
        if let Ok((ramp, ())) = &fetched {
            tracing::info!(?origin, digest = %self.digest, bytes = total, connections = %ramp.history(), "ranged transfer done");
        }
        match fetched {
            Ok(_) => {
                if matches!(origin, Origin::Registry) {
                    origins.registry.count_fetched(total);
                }
                self.finish(resume, total).map(Step::Done)
            }
            // The source's failure, not the disk's: the next source goes on.
            Err(e @ (Error::Upstream(_) | Error::SizeMismatch { .. })) if !matches!(origin, Origin::Registry) => {
                let prefix = progress.lock().unwrap().prefix;
                tracing::warn!(?origin, digest = %self.digest, error = %e, at = prefix, "ranged transfer broke; resuming from the next source");
                // The hash catches up with the published prefix: those bytes are final, and readers had them.
                self.hash_prefix(prefix, resume).await?;
                Ok(Step::Next)
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches chunk `i` (reusing `body` for the first), retrying a broken transfer twice from where it stopped.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_chunk(
        self: &Arc<Self>,
        temp: &TempFile,
        origins: &Origins,
        origin: Origin<'_>,
        i: usize,
        mut body: Option<futures_util::stream::BoxStream<'static, Result<Bytes, upstream::Error>>>,
        progress: &Arc<Mutex<Progress>>,
        reserve: &Reserve,
        stats: &Arc<RangeStats>,
    ) -> Result<(), Error> {
        let (start, len, total) = {
            let p = progress.lock().unwrap();
            (i as u64 * p.chunk_size, p.chunk_len(i), p.total)
        };
        let mut got = 0u64;
        let mut attempts = 0;
        loop {
            // The ramp waits for a new request's first byte before it measures.
            let mut first_byte = (body.is_none() && attempts == 0).then(|| FirstByte::new(stats));
            let stream = match body.take() {
                Some(b) => b,
                None => {
                    let (from, end) = (start + got, start + len - 1);
                    let (_, b) = match origins.open(origin, &self.digest, from, Some(end), Some(total)).await {
                        Ok(answer) => answer,
                        Err(OriginError::Fail(e)) => return Err(e.into()),
                        Err(OriginError::Next { reason, .. }) => {
                            return Err(upstream::Error::Protocol(format!("range request failed: {reason}")).into());
                        }
                    };
                    if b.end != end + 1 {
                        return Err(upstream::Error::Protocol("the origin stopped honouring ranges".into()).into());
                    }
                    b.body
                }
            };
            let (me, p, stats) = (self.clone(), progress.clone(), stats.clone());
            let (mut last, mut unpublished) = (0, None);
            let result =
                write_at(&temp.file, start + got, Some(len - got), reserve, stream, move |_, written, publish| {
                    if let Some(f) = first_byte.as_mut() {
                        f.arrived();
                    }
                    stats.received.fetch_add(written - last, Ordering::Relaxed);
                    let moved = p.lock().unwrap().add(i, written - last);
                    last = written;
                    if let Some(prefix) = moved {
                        unpublished = Some(prefix);
                    }
                    if publish && let Some(prefix) = unpublished.take() {
                        me.publish_prefix(prefix);
                    }
                })
                .await;
            match result {
                Ok(n) if got + n == len => return Ok(()),
                Ok(n) => {
                    got += n;
                    if attempts >= 2 {
                        return Err(Error::SizeMismatch { announced: len, received: got });
                    }
                }
                Err(Error::Upstream(e)) if e.is_unavailable() && attempts < 2 => {
                    got = progress.lock().unwrap().written[i];
                }
                Err(e) => return Err(e),
            }
            attempts += 1;
        }
    }

    /// Hashes the file's contiguous prefix as it grows (reads hit the page cache) into `resume`, until `until`
    /// bytes. Cancel-safe: the hash and its length move together under the verifier's lock, so a hash cut
    /// short is resumed by the next call.
    async fn hash_prefix(self: &Arc<Self>, until: u64, resume: &Resume) -> Result<(), Error> {
        let mut rx = self.subscribe();
        loop {
            let hashed = resume.written.load(Ordering::Acquire);
            if hashed >= until {
                return Ok(());
            }
            let available = match &*rx.borrow_and_update() {
                FillState::Streaming { written, .. } => (*written).min(until),
                FillState::Failed(_) | FillState::Uncached { .. } => {
                    return Err(Error::Io(std::io::Error::other("fill ended early")));
                }
                _ => hashed,
            };
            if available <= hashed {
                if rx.changed().await.is_err() {
                    return Err(Error::Io(std::io::Error::other("fill vanished")));
                }
                continue;
            }
            let (file, verifier, written) = (self.file.clone(), resume.verifier.clone(), resume.written.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut verifier = verifier.lock().unwrap();
                // Hashed straight from the page cache through a mapping: no copy, no buffer to allocate.
                let mut pos = written.load(Ordering::Acquire);
                while pos < available {
                    let n = (available - pos).min(HASH_PIECE);
                    verifier.update(&map_chunk(&file, pos, n as usize)?);
                    pos += n;
                    written.store(pos, Ordering::Release);
                }
                Ok(())
            })
            .await??;
        }
    }

    fn check(&self, actual: Digest, size: u64) -> Result<u64, Error> {
        if actual != self.digest {
            return Err(Error::DigestMismatch { expected: self.digest.clone(), actual });
        }
        Ok(size)
    }
}

/// Writes `body` at `offset` on the blocking pool (no more than `limit` bytes, and none while free space is
/// below `reserve`) and calls `on_write` with each piece, the running count after it is in the file, and
/// whether to publish the progress to readers now. Returns the bytes written.
///
/// Received pieces go to the writer thread in batches of up to [`BATCH`] bytes, or what arrived within
/// [`BATCH_DELAY`]: a source that sends small pieces (an object store, a busy peer) otherwise woke the
/// writer thread for each one, and those wake-ups and context switches cost more CPU than the writes.
/// Progress is published when the writer has nothing more queued (so a stalled source never holds back
/// bytes already written) or every [`PUBLISH_EVERY`] bytes, rather than per piece, which woke every reader
/// as often.
async fn write_at(
    file: &Arc<File>,
    offset: u64,
    limit: Option<u64>,
    reserve: &Reserve,
    mut body: futures_util::stream::BoxStream<'static, Result<Bytes, upstream::Error>>,
    mut on_write: impl FnMut(&[u8], u64, bool) + Send + 'static,
) -> Result<u64, Error> {
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(QUEUED);
    let (file, reserve) = (file.clone(), reserve.clone());
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut written = 0u64;
        let mut next_check = 0u64;
        let mut published = 0u64;
        while let Some(batch) = rx.blocking_recv() {
            let pieces = batch.len();
            for (i, chunk) in batch.into_iter().enumerate() {
                if written >= next_check {
                    next_check = written.saturating_add(reserve.check()?);
                }
                file.write_all_at(&chunk, offset + written)?;
                written += chunk.len() as u64;
                let publish = (i + 1 == pieces && rx.is_empty()) || written - published >= PUBLISH_EVERY;
                if publish {
                    published = written;
                }
                on_write(&chunk, written, publish);
            }
        }
        Ok(written)
    });
    let mut received = 0u64;
    let mut failure = None;
    let (mut batch, mut batched) = (Vec::new(), 0usize);
    let delay = tokio::time::sleep(BATCH_DELAY);
    tokio::pin!(delay);
    'body: loop {
        let item = tokio::select! {
            biased;
            item = body.next() => item,
            () = &mut delay, if batched > 0 => {
                batched = 0;
                if tx.send(std::mem::take(&mut batch)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        match item {
            Some(Ok(chunk)) => {
                received += chunk.len() as u64;
                if limit.is_some_and(|l| received > l) {
                    failure = Some(Error::SizeMismatch { announced: limit.unwrap_or(0), received });
                    break;
                }
                let mut chunk = chunk;
                // Large chunks (an object store may send hundreds of KiB at once) are cut, so that a batch
                // never holds more than BATCH bytes and the queue at most QUEUED × BATCH.
                while !chunk.is_empty() {
                    if batched == 0 {
                        delay.as_mut().reset(tokio::time::Instant::now() + BATCH_DELAY);
                    }
                    let piece = chunk.split_to(chunk.len().min(BATCH - batched));
                    batched += piece.len();
                    batch.push(piece);
                    if batched == BATCH {
                        batched = 0;
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
                            break 'body;
                        }
                    }
                }
            }
            Some(Err(e)) => {
                failure = Some(e.into());
                break;
            }
            None => break,
        }
    }
    // What arrived before the body ended (or broke) is written too: resuming starts after it.
    if !batch.is_empty() {
        let _ = tx.send(batch).await;
    }
    drop(tx);
    let written = writer.await??;
    match failure {
        Some(e) => Err(e),
        None => Ok(written),
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn prefix_advances_only_over_complete_chunks() {
        let mut p = Progress { chunk_size: 10, total: 25, written: vec![0; 3], prefix: 0 };
        assert_eq!(p.add(1, 10), None, "chunk 1 done, chunk 0 empty");
        assert_eq!(p.add(0, 4), Some(4));
        assert_eq!(p.add(0, 6), Some(20), "chunk 0 completes and chunk 1 was already complete");
        assert_eq!(p.add(2, 5), Some(25));
    }
}
