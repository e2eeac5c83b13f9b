//! The cache: decides hit, join or fill for blobs, and owns manifests, tags and metadata.
//! It never builds an HTTP response; `api` turns its handles into responses.
//!
//! A blob request: [`Cache::blob`] → committed file (hit) | running fill (coalesced) | new fill (miss, spawned
//! on the cache's task tracker so it outlives the client) → [`reader::body`] streams the bytes.

mod error;
mod evict;
mod fill;
mod inflight;
mod manifests;
pub mod meta;
mod origin;
mod ramp;
pub mod reader;
mod store;

pub use error::Error;
pub use evict::{EvictRefusal, GcReport, Usage};
pub use fill::{Fill, FillPlan, FillState, Reserve};
pub use manifests::{ManifestAnswer, ManifestInfo};
pub use origin::Origins;
pub use store::BlobStore;

use crate::cluster::{Cluster, FillStatus};
use crate::config::{CacheSettings, Config};
use crate::metrics::{Metrics, ReasonLabel};
use crate::oci::{Digest, RepoName};
use crate::upstream::RegistryClient;
use inflight::{Claim, Inflight, Lookup};
use meta::{Health, Meta, MetaCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How often a failed metadata database is reopened, and a working one checked (sled reports a failed
/// background write only to later calls).
const META_CHECK_EVERY: Duration = Duration::from_secs(2);

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From disk or memory, no upstream request.
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// Joined a fill another request started.
    Coalesced,
    /// A tag revalidated upstream with a HEAD, content from cache.
    Revalidated,
    /// Upstream failed; last known content served.
    Stale,
    /// Forwarded to the upstream without caching.
    Passthrough,
    /// Streamed from upstream without being cached (too large for the budget, or the disk was full).
    Uncached,
}

impl Outcome {
    /// Lowercase name for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Passthrough => "passthrough",
            Outcome::Uncached => "uncached",
        }
    }
}

/// A blob ready to stream: where its bytes are, its size, and a guard that keeps it from eviction meanwhile.
pub struct BlobHandle {
    /// Committed file or running fill.
    pub source: reader::Source,
    /// Size, when known (a fill without an announced length learns it at the end).
    pub size: Option<u64>,
    /// Held for as long as the response streams.
    pub guard: ServeGuard,
}

/// Marks a blob as being served; eviction skips it until every guard is dropped.
pub struct ServeGuard {
    shared: Arc<Shared>,
    digest: Digest,
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        let mut serving = self.shared.serving.lock().unwrap();
        if let Some(n) = serving.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                serving.remove(&self.digest);
            }
        }
    }
}

/// Cheap-clone handle to the cache.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

struct Shared {
    store: BlobStore,
    meta: MetaCell,
    /// The free space fills leave for the metadata.
    reserve: Reserve,
    inflight: Arc<Inflight>,
    /// Fills run here, not on the request's task, and shutdown waits for them.
    tasks: TaskTracker,
    tag_ttl: u64,
    plan: FillPlan,
    metrics: Arc<Metrics>,
    settings: CacheSettings,
    /// Bytes of committed blobs (kept in step with commits and evictions).
    bytes: AtomicU64,
    /// Digest → responses streaming it now.
    serving: Mutex<HashMap<Digest, usize>>,
    /// Digest → last access (unix milliseconds), flushed to the metadata in batches rather than on every read.
    accessed: Mutex<HashMap<Digest, u64>>,
    /// One eviction pass at a time.
    gc_lock: Mutex<()>,
    /// Fills allowed to talk to upstreams at once (`server.max_fills`); the rest queue here.
    fill_slots: tokio::sync::Semaphore,
    /// Upstream manifest requests under way, shared by the requests that need the same answer.
    manifest_flights: manifests::Flights,
    /// The other wharf instances, when the cluster tier is on: blobs and tags owned by another node are
    /// fetched from it.
    cluster: OnceLock<Cluster>,
    /// The shared bucket, when configured: read before the upstream, written alongside an upstream fill.
    bucket: OnceLock<crate::bucket::Bucket>,
}

impl Cache {
    /// Opens the data directory: removes leftover temporary files, opens (or rebuilds) the metadata.
    /// Blocking; call before serving.
    pub fn open(config: &Config, metrics: Arc<Metrics>, tasks: TaskTracker) -> Result<Cache, Error> {
        let data_dir = &config.data_dir;
        let plan = FillPlan {
            chunk_size: config.upstream.fill_chunk_size,
            concurrency: config.upstream.fill_concurrency.max(1),
        };
        let tag_ttl = config.tag_ttl;
        let store = BlobStore::open(data_dir)?;
        let (meta, fresh) = Meta::open(&data_dir.join("meta"))?;
        // Also when the database is not new: a crash can lose its last writes, and a blob it does not know
        // would never be evicted.
        let blobs = store.scan_blobs()?;
        let (recorded, dropped) = meta.reconcile_blobs(&blobs)?;
        if fresh {
            meta.mark_initialized()?;
            tracing::info!(blobs = blobs.len(), "metadata rebuilt from the blob tree");
        } else if recorded + dropped > 0 {
            tracing::warn!(recorded, dropped, "blob metadata was behind the blob tree (a crash?); caught up");
        }
        let (bytes, _) = meta.blob_totals()?;
        metrics.cache_bytes.set(bytes as i64);
        metrics.cache_max_bytes.set(config.cache.max_bytes as i64);
        metrics.high_watermark_ratio.set(f64::from(config.cache.high_watermark) / 100.0);
        metrics.low_watermark_ratio.set(f64::from(config.cache.low_watermark) / 100.0);
        let shared = Shared {
            reserve: Reserve::new(store.clone(), config.cache.min_free_bytes),
            store,
            meta: MetaCell::new(meta, &data_dir.join("meta"), Arc::new(Health::default())),
            inflight: Arc::default(),
            tasks,
            tag_ttl,
            plan,
            settings: config.cache.clone(),
            bytes: AtomicU64::new(bytes),
            serving: Mutex::default(),
            accessed: Mutex::default(),
            gc_lock: Mutex::default(),
            fill_slots: tokio::sync::Semaphore::new(config.server.max_fills.max(1)),
            manifest_flights: manifests::flights(&metrics, crate::upstream::flight::limit(config)),
            metrics,
            cluster: OnceLock::new(),
            bucket: OnceLock::new(),
        };
        Ok(Cache { shared: Arc::new(shared) })
    }

    /// Joins the cache to a cluster (once, before serving): misses on content another node owns are
    /// fetched from that node.
    pub fn set_cluster(&self, cluster: Cluster) {
        let _ = self.shared.cluster.set(cluster);
    }

    /// Puts the shared bucket below the disk (once, before serving).
    pub fn set_bucket(&self, bucket: crate::bucket::Bucket) {
        let _ = self.shared.bucket.set(bucket);
    }

    /// The cluster, when the tier is on.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.shared.cluster.get()
    }

    /// How this node's fill of `digest` is going, for a peer that streams from it and wonders why the
    /// bytes stopped.
    pub async fn fill_status(&self, digest: &Digest) -> Result<FillStatus, Error> {
        if let Some(fill) = self.shared.inflight.get(digest) {
            let (written, total) = match fill.state() {
                FillState::Streaming { written, total } => (written, total),
                FillState::Done { size } => (size, Some(size)),
                _ => (0, None),
            };
            return Ok(FillStatus { state: "filling".into(), written, total, stalled_ms: fill.stalled_ms() });
        }
        let store = self.shared.store.clone();
        let d = digest.clone();
        let size = tokio::task::spawn_blocking(move || store.blob_size(&d)).await??;
        let state = if size.is_some() { "done" } else { "none" };
        Ok(FillStatus { state: state.into(), written: size.unwrap_or(0), total: size, stalled_ms: 0 })
    }

    /// The on-disk store (readiness checks write through it).
    pub fn store(&self) -> &BlobStore {
        &self.shared.store
    }

    /// Whether the metadata database works; while it does not, blobs and manifests are served from the
    /// files and a background task reopens it (see [`Cache::spawn_gc_loop`]).
    pub fn metadata_healthy(&self) -> bool {
        self.shared.meta.is_healthy()
    }

    /// Number of fills running now.
    pub fn fills_in_flight(&self) -> usize {
        self.shared.inflight.len()
    }

    /// Finds or starts the blob. On a miss the fill is spawned and this waits only for the upstream's
    /// answer (so a 404 is still a clean 404), not for the bytes. With a cluster, a blob another node owns
    /// is fetched from that node.
    pub async fn blob(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(BlobHandle, Outcome), Error> {
        self.blob_via(client, repo, digest, true).await
    }

    /// [`Cache::blob`] for a peer's request: served from disk or this node's own fill, or fetched from the
    /// upstream; never from another peer (so disagreeing views cannot make a loop).
    pub async fn blob_for_peer(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(BlobHandle, Outcome), Error> {
        self.blob_via(client, repo, digest, false).await
    }

    async fn blob_via(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
        forward: bool,
    ) -> Result<(BlobHandle, Outcome), Error> {
        let guard = self.guard(digest);
        let shared = self.shared.clone();
        let d = digest.clone();
        let lookup = tokio::task::spawn_blocking(move || shared.inflight.lookup_or_claim(&shared.store, &d)).await??;
        let (fill, outcome) = match lookup {
            Lookup::Hit(file, size) => {
                let source = reader::Source::Committed(Arc::new(file));
                return Ok((BlobHandle { source, size: Some(size), guard }, Outcome::Hit));
            }
            Lookup::Joined(fill) if !forward && fill.via_peer() => return Err(Error::ViaPeer),
            Lookup::Joined(fill) => (fill, Outcome::Coalesced),
            Lookup::Owner(claim) => {
                let this = self.clone();
                let fill = claim.fill.clone();
                fill.set_origin(client.clone(), repo.clone());
                let cluster = self.shared.cluster.get().filter(|_| forward);
                let origins = Origins {
                    registry: client.clone(),
                    repo: repo.clone(),
                    peers: cluster.map(|c| c.sources(&digest.to_string())).unwrap_or_default(),
                    cluster: cluster.cloned(),
                    bucket: self.shared.bucket.get().cloned(),
                };
                // The claim moves into the task: if the task panics, unwinding drops it and fails the fill.
                self.shared.tasks.spawn(this.run_fill(claim, origins));
                (fill, Outcome::Miss)
            }
        };
        let size = fill.wait_started().await.map_err(Error::unshare)?;
        Ok((BlobHandle { source: reader::Source::Filling(fill), size, guard }, outcome))
    }

    /// Makes sure a blob is cached (starting or joining a fill) and returns its size: for the warm list and
    /// prefetching, which want the blob on disk and no bytes.
    pub async fn ensure_blob(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<u64, Error> {
        let (handle, _) = self.blob(client, repo, digest).await?;
        match handle.source {
            reader::Source::Committed(_) => Ok(handle.size.unwrap_or_default()),
            reader::Source::Filling(fill) => match fill.wait_done().await {
                // Refused before its first byte: it can never be cached, which is all a warm-up can do.
                Err(_) if fill.refused() => Ok(handle.size.unwrap_or_default()),
                done => done.map_err(Error::unshare),
            },
        }
    }

    /// Whether `repo` of `registry` is known to reference `digest`: it was fetched through that repository,
    /// or the upstream confirmed it (see [`Cache::record_ref`]). Private content is served per repository.
    pub fn is_referenced(&self, registry: &str, repo: &RepoName, digest: &Digest) -> Result<bool, Error> {
        Ok(self.shared.meta.has_ref(&format!("{registry}/{repo}"), digest)?)
    }

    /// Records that the upstream confirmed `repo` references `digest`.
    pub fn record_ref(&self, registry: &str, repo: &RepoName, digest: &Digest) -> Result<(), Error> {
        Ok(self.shared.meta.add_ref(&format!("{registry}/{repo}"), digest)?)
    }

    /// Registers a response streaming `digest` (and counts it as an access).
    fn guard(&self, digest: &Digest) -> ServeGuard {
        *self.shared.serving.lock().unwrap().entry(digest.clone()).or_default() += 1;
        self.shared.accessed.lock().unwrap().insert(digest.clone(), self.shared.meta.stamp());
        ServeGuard { shared: self.shared.clone(), digest: digest.clone() }
    }

    /// Replaces the digests pinned under `name` (a warm-list image); pinned blobs are never evicted.
    pub fn set_pins(&self, name: &str, digests: &[Digest]) -> Result<(), Error> {
        Ok(self.shared.meta.set_pins(name, digests)?)
    }

    /// Every pin: name → digests.
    pub fn pins(&self) -> Result<BTreeMap<String, Vec<Digest>>, Error> {
        Ok(self.shared.meta.pins()?)
    }

    /// Cached repositories (`<registry>/<repo>`) with the tags wharf has resolved for them.
    pub fn repositories(&self) -> Result<BTreeMap<String, Vec<String>>, Error> {
        let mut out: BTreeMap<String, Vec<String>> =
            self.shared.meta.repositories()?.into_iter().map(|r| (r, Vec::new())).collect();
        for (key, _) in self.shared.meta.tags()? {
            // Key: `<registry>/<repo>:<tag>#<class>`.
            let key = key.rsplit_once('#').map_or(key.as_str(), |(k, _)| k);
            if let Some((repo, tag)) = key.rsplit_once(':') {
                let tags = out.entry(repo.to_owned()).or_default();
                if !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Runs a claimed fill to its end; dropping `claim` at the end (or on a panic) frees the digest.
    /// Boxed with its `Send` bound spelled out: a fill may start another fill (a refetch after a peer's
    /// wrong bytes), and an `async fn` cannot contain its own future.
    fn run_fill(
        self,
        claim: Claim,
        origins: Origins,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.fill_to_end(claim, origins).await })
    }

    async fn fill_to_end(&self, mut claim: Claim, origins: Origins) {
        let (client, repo) = (&*origins.registry, &origins.repo);
        let fill = claim.fill.clone();
        let digest = fill.digest.clone();
        #[cfg(test)]
        tests::maybe_panic(&digest);
        let Some(temp) = claim.temp.take() else {
            return fill.fail(Error::Abandoned);
        };
        let metrics = &self.shared.metrics;
        let started = std::time::Instant::now();
        // Room is made (or the blob refused) once its size is known, before its first byte is written.
        let this = self.clone();
        let admit = |size| async move { this.admit(size).await };
        // The fill slot (`server.max_fills`) is taken inside, only for the registry: a fill waiting on a peer
        // must not hold one, or two nodes filling from each other could starve each other's slots.
        let slots = &self.shared.fill_slots;
        if let Some(bucket) = self.shared.bucket.get() {
            self.shared.tasks.spawn(share(bucket.clone(), fill.clone()));
        }
        let result = fill.download(&temp, &origins, self.shared.plan, &self.shared.reserve, admit, slots).await;
        let mut temp = Some(temp);
        let result = match result {
            Ok(Some(size)) => self.commit(temp.take().expect("not yet used"), &digest, size, client, repo).await,
            Ok(None) => {
                // Nothing was written: everyone who asked streams it from the upstream.
                tracing::warn!(%digest, "blob larger than the cache can hold; streamed without caching");
                metrics.uncached.get_or_create(&ReasonLabel { reason: "too_large" }).inc();
                drop(temp.take());
                fill.refuse();
                return;
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(size) => {
                metrics.fill_duration.observe(started.elapsed().as_secs_f64());
                tracing::info!(%digest, size, registry = %client.name, %repo, "blob fill done");
                fill.done(size);
            }
            Err(Error::Io(e)) if is_disk_full(&e) => {
                // The clients still get their bytes: readers continue from the upstream on their own.
                tracing::error!(%digest, error = %e, "disk full during a fill; streaming without caching");
                metrics.uncached.get_or_create(&ReasonLabel { reason: "disk_full" }).inc();
                metrics.fill_failures.get_or_create(&ReasonLabel { reason: "disk_full" }).inc();
                drop(temp.take());
                fill.uncache();
            }
            Err(e) => {
                let source_corrupt = fill.source_corrupt();
                let reason = match &e {
                    Error::DigestMismatch { .. } if source_corrupt => "bad_content",
                    Error::DigestMismatch { .. } | Error::SizeMismatch { .. } => {
                        tracing::error!(%digest, registry = %client.name, %repo, error = %e, "upstream sent bad bytes; discarded");
                        "bad_content"
                    }
                    Error::Upstream(_) => {
                        tracing::warn!(%digest, registry = %client.name, %repo, error = %e, "blob fill failed");
                        "upstream"
                    }
                    _ => {
                        tracing::warn!(%digest, registry = %client.name, %repo, error = %e, "blob fill failed");
                        "local"
                    }
                };
                metrics.fill_failures.get_or_create(&ReasonLabel { reason }).inc();
                fill.fail(e);
                if source_corrupt {
                    // A peer or the bucket sent wrong bytes (now skipped for this blob): fetch it again at once,
                    // from the upstream itself, so the clients' retries find it (and the bucket gets the right
                    // bytes). The claim goes first, or the refetch would join this failed fill. Once only: the
                    // refetch asks no peer, and the bucket no longer offers this blob.
                    drop(claim);
                    let (this, client, repo) = (self.clone(), origins.registry.clone(), origins.repo.clone());
                    self.shared.tasks.spawn(async move {
                        let refetched = match this.blob_via(&client, &repo, &digest, false).await {
                            Ok((handle, _)) => match handle.source {
                                reader::Source::Filling(fill) => {
                                    fill.wait_done().await.map(drop).map_err(Error::unshare)
                                }
                                reader::Source::Committed(_) => Ok(()),
                            },
                            Err(e) => Err(e),
                        };
                        if let Err(e) = refetched {
                            tracing::warn!(%digest, error = %e, "refetching a blob a peer sent wrong");
                        }
                    });
                }
            }
        }
    }

    /// Whether a blob of `size` bytes may be cached: evicts what it needs, then checks it fits the byte
    /// budget and the filesystem's high watermark (less the free-space reserve). What eviction cannot free
    /// (pinned, in use, recently used) stays, so a blob over what remains is refused. A blob of unknown size
    /// is admitted: the reserve and ENOSPC still stop it.
    async fn admit(&self, size: Option<u64>) -> bool {
        let Some(size) = size else { return true };
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.fits_after_eviction(size)).await.unwrap_or(true)
    }

    fn fits_after_eviction(&self, size: u64) -> bool {
        if self.needed_bytes(size) > 0
            && let Err(e) = self.gc_blocking(size)
        {
            tracing::warn!(error = %e, "eviction before a fill failed");
        }
        let s = &self.shared.settings;
        // Saturating: `size` is the upstream's word, and an absurd one must be refused, not wrap or panic.
        if s.max_bytes > 0 && self.shared.bytes.load(Ordering::Relaxed).saturating_add(size) > s.max_bytes {
            return false;
        }
        let Ok((total, used)) = self.shared.store.filesystem() else { return true };
        let reserve = store::reserve(total, s.min_free_bytes);
        let after = used.saturating_add(size);
        total == 0
            || (after.saturating_mul(100) <= total.saturating_mul(u64::from(s.high_watermark))
                && after.saturating_add(reserve) <= total)
    }

    async fn commit(
        &self,
        temp: store::TempFile,
        digest: &Digest,
        size: u64,
        client: &RegistryClient,
        repo: &RepoName,
    ) -> Result<u64, Error> {
        let store = self.shared.store.clone();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || store.commit_blob(temp, &d)).await??;
        self.shared.bytes.fetch_add(size, Ordering::Relaxed);
        // Best effort: the file is committed, and a reopened database records it from the blob tree.
        self.shared.meta.record_blob(digest, size, Some(&format!("{}/{}", client.name, repo)))?;
        Ok(size)
    }

    /// Size of a blob for a HEAD: from disk, from a running fill, or from an upstream HEAD. Never starts a fill.
    pub async fn blob_info(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, Outcome), Error> {
        let store = self.shared.store.clone();
        let d = digest.clone();
        if let Some(size) = tokio::task::spawn_blocking(move || store.blob_size(&d)).await?? {
            return Ok((size, Outcome::Hit));
        }
        if let Some(fill) = self.shared.inflight.get(digest)
            && let Ok(Some(size)) = fill.wait_started().await
        {
            return Ok((size, Outcome::Coalesced));
        }
        match client.head_blob(repo, digest).await? {
            Some(size) => Ok((size, Outcome::Passthrough)),
            None => Err(crate::upstream::Error::Protocol("blob HEAD without Content-Length".into()).into()),
        }
    }
}

/// ENOSPC and EDQUOT: the disk (or the quota) is full.
fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

// ---- Cache-only lookups for the admin API (added with src/admin.rs; nothing here contacts an upstream). ----
impl Cache {
    /// Manifest digests a tag resolves to in the cache (the index and the single-platform answer, when both
    /// are known), without asking the upstream. `registry` is the registry's name, `repo` as it knows it.
    pub fn cached_tag(&self, registry: &str, repo: &RepoName, tag: &str) -> Result<Vec<Digest>, Error> {
        // Tag keys are `<registry>/<repo>:<tag>#<class>` (see `manifests::tag_key`).
        let prefix = format!("{registry}/{repo}:{tag}#");
        let mut out = Vec::new();
        for (key, entry) in self.shared.meta.tags()? {
            if key.starts_with(&prefix) && !out.contains(&entry.digest) {
                out.push(entry.digest);
            }
        }
        Ok(out)
    }
}

/// Uploads a blob new to the cluster (its fill went to the registry) to the bucket while it is filled:
/// from the fill's file, completed once the fill has verified and committed it. A blob that came from a peer
/// or the bucket is already shared and is left alone.
async fn share(bucket: crate::bucket::Bucket, fill: Arc<Fill>) {
    if fill.goes_to_registry().await {
        bucket.upload_following(&fill.digest, fill.file.clone(), fill.progress()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use crate::upstream::Upstreams;
    use std::time::Duration;

    /// Digests whose fill task panics as it starts (the panic path of a claimed fill).
    static PANIC_ON: Mutex<Vec<Digest>> = Mutex::new(Vec::new());

    pub(super) fn maybe_panic(digest: &Digest) {
        let panics = PANIC_ON.lock().unwrap().contains(digest);
        assert!(!panics, "test: the fill task panics");
    }

    /// A cache in `dir` whose only registry refuses connections, so every fill fails at once.
    fn setup(dir: &std::path::Path) -> (Cache, Arc<RegistryClient>, RepoName) {
        let o = Overrides {
            data_dir: Some(dir.to_owned()),
            upstreams: vec![("refusing.test".into(), "http://127.0.0.1:1".into())],
            default_registry: Some("refusing.test".into()),
            ..Default::default()
        };
        let config = Config::load(None, &o).unwrap();
        let metrics = Arc::new(Metrics::new());
        let upstreams = Upstreams::from_config(&config, metrics.clone()).unwrap();
        let cache = Cache::open(&config, metrics, TaskTracker::new()).unwrap();
        (cache, upstreams.get("refusing.test").unwrap(), RepoName::parse("team/app").unwrap())
    }

    /// Bounds a request that, with a stuck fill, would wait forever.
    async fn answered<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what} was left waiting"))
    }

    #[test]
    fn a_request_cancelled_during_its_claim_leaves_no_stuck_fill() {
        // One blocking thread: the claim can be held in its queue while the request is cancelled.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let (cache, client, repo) = setup(dir.path());
            let digest = Digest::sha256_of(b"cancelled during the claim");
            let (release, blocked) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || blocked.recv());
            let request = tokio::spawn({
                let (cache, client, repo, digest) = (cache.clone(), client.clone(), repo.clone(), digest.clone());
                async move { cache.blob(&client, &repo, &digest).await.map(|_| ()) }
            });
            // The request registers its serve guard just before it queues the claim.
            answered("the request's start", async {
                while !cache.shared.serving.lock().unwrap().contains_key(&digest) {
                    tokio::task::yield_now().await;
                }
            })
            .await;
            request.abort();
            assert!(request.await.unwrap_err().is_cancelled());
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            // Queued behind the orphaned claim on the one blocking thread: once this ran, so did the claim.
            tokio::task::spawn_blocking(|| ()).await.unwrap();
            assert_eq!(cache.fills_in_flight(), 0, "the orphaned claim is still in flight");
            let later = answered("a later request", cache.blob(&client, &repo, &digest)).await;
            assert!(matches!(later, Err(Error::Upstream(_))), "expected the upstream's refusal");
        });
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_fill_task_that_panics_fails_its_readers_and_frees_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, client, repo) = setup(dir.path());
        let digest = Digest::sha256_of(b"a fill that panics");
        PANIC_ON.lock().unwrap().push(digest.clone());
        let first = answered("the request whose fill panicked", cache.blob(&client, &repo, &digest)).await;
        assert!(matches!(first, Err(Error::Abandoned)), "expected an abandoned fill");
        assert_eq!(cache.fills_in_flight(), 0, "the panicked fill is still in flight");
        PANIC_ON.lock().unwrap().retain(|d| d != &digest);
        let later = answered("a later request", cache.blob(&client, &repo, &digest)).await;
        assert!(matches!(later, Err(Error::Upstream(_))), "expected a new fill and the upstream's refusal");
    }
}
