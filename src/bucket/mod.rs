//! The shared object-storage tier: an S3-compatible bucket below every node's disk and above the upstream.
//! Objects are content-addressed and immutable (`<prefix>/blobs/sha256/<hex>`, and manifests by digest at
//! `<prefix>/manifests/sha256/<hex>` with their media type as `Content-Type`), so any node may read what
//! any node wrote; tags never go to the bucket. Reads are bounded (short timeouts, few retries) and a
//! circuit breaker skips a failing bucket for a while: a bucket that is down costs one pull a few seconds,
//! not every pull.

use crate::config::S3Settings;
use crate::metrics::{Metrics, ReasonLabel};
use crate::oci::Digest;
use crate::upstream;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, RetryConfig,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for a bucket's answer, or for the next bytes of an object: past it the blob comes from the
/// next source (the upstream), resumed where the bucket stopped.
const STALL: Duration = Duration::from_secs(5);

/// Bytes per multipart part (S3's minimum is 5 MiB).
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight per upload: the bound on an upload's buffered memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Multipart uploads at once: with `PARTS_IN_FLIGHT`, the bound on all uploads' memory. An upload waiting
/// for its turn costs nothing: its bytes are read back from the fill's file when it runs.
const UPLOADS: usize = 4;

/// Why the bucket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("storage.s3: {0}")]
pub struct SetupError(#[from] object_store::Error);

/// Cheap-clone handle to the bucket.
#[derive(Clone, Debug)]
pub struct Bucket {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    metrics: Arc<Metrics>,
    /// Milliseconds after `epoch` until which the bucket is skipped (0: closed).
    open_until_ms: AtomicU64,
    epoch: Instant,
    /// How long a failure opens the breaker.
    breaker: Duration,
    /// Longest an upload part (or the upload's completion) may take before the upload is abandoned.
    part_time: Duration,
    /// Objects whose bytes failed verification: not read again, and overwritten by the next upload.
    corrupt: Mutex<HashSet<Digest>>,
    /// Turns for multipart uploads (see `UPLOADS`).
    uploads: tokio::sync::Semaphore,
}

impl Bucket {
    /// The bucket of a configuration, or `None` when none is configured. Credentials come from the config
    /// keys, else the standard AWS chain (environment, web identity, instance profile).
    pub fn from_settings(s: Option<&S3Settings>, metrics: Arc<Metrics>) -> Result<Option<Bucket>, SetupError> {
        let Some(s) = s else { return Ok(None) };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&s.bucket).with_region(&s.region);
        if !s.endpoint.is_empty() {
            b = b.with_endpoint(&s.endpoint);
        }
        if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        // A bucket that does not answer quickly is not worth waiting for: the upstream is the fallback.
        let retry = RetryConfig { max_retries: 1, retry_timeout: Duration::from_secs(5), ..RetryConfig::default() };
        // No whole-request timeout (a large blob takes as long as it takes): a stalled body is cut by
        // `STALL` in `open`, and the answer's head by the same bound.
        let options = ClientOptions::new()
            .with_allow_http(s.allow_http)
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout_disabled();
        let store = b.with_retry(retry).with_client_options(options).build()?;
        let prefix = s.prefix.trim_matches('/').to_owned();
        let inner = Inner {
            store: Arc::new(store),
            prefix,
            metrics,
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            breaker: Duration::from_secs(s.breaker_seconds.max(1)),
            part_time: Duration::from_secs(s.part_timeout_seconds.max(1)),
            corrupt: Mutex::default(),
            uploads: tokio::sync::Semaphore::new(UPLOADS),
        };
        Ok(Some(Bucket { inner: Arc::new(inner) }))
    }

    fn path(&self, digest: &Digest) -> Path {
        self.path_in("blobs", digest)
    }

    fn path_in(&self, kind: &str, digest: &Digest) -> Path {
        let key = format!("{kind}/{}/{}", digest.algorithm().as_str(), digest.hex());
        if self.inner.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.inner.prefix)) }
    }

    /// Whether the breaker lets requests through now.
    pub fn is_usable(&self) -> bool {
        let now = self.inner.epoch.elapsed().as_millis() as u64;
        let open = self.inner.open_until_ms.load(Ordering::Relaxed) > now;
        self.inner.metrics.bucket_breaker_open.set(i64::from(open));
        !open
    }

    fn trip(&self, what: &str, e: &object_store::Error) {
        let until = (self.inner.epoch.elapsed() + self.inner.breaker).as_millis() as u64;
        self.inner.open_until_ms.store(until, Ordering::Relaxed);
        self.inner.metrics.bucket_breaker_open.set(1);
        self.count("error");
        let kind = match e {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => "denied",
            object_store::Error::Generic { source, .. } if source.to_string().starts_with(NO_ANSWER) => "timeout",
            _ => "unavailable",
        };
        self.inner.metrics.bucket_errors.get_or_create(&ReasonLabel { reason: kind }).inc();
        tracing::warn!(error = %e, kind, "bucket {what} failed; skipping the bucket for {}s", self.inner.breaker.as_secs());
    }

    /// Records that the object of `digest` failed verification: it is not read again, the refetched blob's
    /// upload replaces it, and it is counted.
    pub fn mark_corrupt(&self, digest: &Digest) {
        self.inner.corrupt.lock().unwrap().insert(digest.clone());
        self.count("corrupt");
        tracing::error!(%digest, "the bucket's object failed verification; not read again, replaced by the next upload");
    }

    fn is_corrupt(&self, digest: &Digest) -> bool {
        self.inner.corrupt.lock().unwrap().contains(digest)
    }

    fn count(&self, result: &'static str) {
        self.inner.metrics.bucket_requests.get_or_create(&ReasonLabel { reason: result }).inc();
    }

    /// A GET within the answer bound: `None` (counted as a miss) when the object does not exist; other
    /// errors open the breaker.
    async fn get(&self, path: &Path, options: GetOptions) -> Result<Option<GetResult>, object_store::Error> {
        match bounded(STALL, self.inner.store.get_opts(path, options)).await {
            Ok(got) => Ok(Some(got)),
            Err(object_store::Error::NotFound { .. }) => {
                self.count("miss");
                Ok(None)
            }
            Err(e) => {
                self.trip("read", &e);
                Err(e)
            }
        }
    }

    /// The blob's bytes from `from` on (through `end`, inclusive, when given) and the object's size,
    /// `Ok(None)` when the bucket does not hold it. The first ranged GET doubles as the existence check, so a
    /// hit costs no extra round trip. Errors open the breaker.
    pub async fn open(
        &self,
        digest: &Digest,
        from: u64,
        end: Option<u64>,
    ) -> Result<Option<(u64, BoxStream<'static, Result<Bytes, upstream::Error>>)>, object_store::Error> {
        if self.is_corrupt(digest) {
            return Ok(None);
        }
        let path = self.path(digest);
        let range = match end {
            Some(end) => Some(GetRange::Bounded(from..end + 1)),
            None => (from > 0).then_some(GetRange::Offset(from)),
        };
        let options = GetOptions { range, ..GetOptions::default() };
        let Some(got) = self.get(&path, options).await? else { return Ok(None) };
        if from == 0 {
            // One hit per blob, not one per range.
            self.count("hit");
        }
        let total = got.meta.size;
        let metrics = self.inner.metrics.clone();
        let stream = got.into_stream();
        let body = futures_util::stream::unfold(Some(stream), |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout(STALL, stream.next()).await {
                Ok(Some(item)) => Some((item, Some(stream))),
                Ok(None) => None,
                Err(_) => {
                    let source = format!("{NO_ANSWER} {STALL:?}: the object's bytes stalled").into();
                    let e = object_store::Error::Generic { store: "S3", source };
                    Some((Err(e), None))
                }
            }
        });
        // A body that breaks or stalls opens the breaker too: the next pulls go straight to the upstream.
        let me = self.clone();
        let body = body
            .inspect_ok(move |b| {
                metrics.bucket_bytes.get_or_create(&ReasonLabel { reason: "read" }).inc_by(b.len() as u64);
            })
            .map_err(move |e| {
                me.trip("read", &e);
                upstream::Error::Protocol(format!("bucket read: {e}"))
            })
            .boxed();
        Ok(Some((total, body)))
    }

    /// Uploads a blob while it is being filled, from the fill's file, following `progress`: parts of the
    /// prefix written so far (final, not yet verified) go up as it grows, a bounded number in flight, read
    /// back from the file, so the fill and its clients never wait for the bucket. The upload is completed
    /// only once the fill reports the blob verified; aborted if it fails, so an object never holds unverified bytes and no
    /// unfinished multipart upload is left behind. A blob of one part or less is put in one create-only
    /// request after verification. Skipped when the bucket holds the blob already (unless its copy failed
    /// verification: then it is replaced). An upload the bucket cannot keep up with is abandoned and counted.
    pub async fn upload_following(
        &self,
        digest: &Digest,
        file: Arc<std::fs::File>,
        mut progress: impl futures_util::Stream<Item = Progress> + Unpin + Send,
    ) {
        if !self.is_usable() {
            return;
        }
        let path = self.path(digest);
        let replace = self.is_corrupt(digest);
        if !replace {
            match bounded(STALL, self.inner.store.head(&path)).await {
                Ok(_) => return,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return self.trip("check", &e),
            }
        }
        // Until a whole part has landed, the blob may turn out small enough for one put.
        let mut latest = Progress::Written(0);
        while let Progress::Written(n) = latest {
            if n >= PART as u64 {
                break;
            }
            latest = progress.next().await.unwrap_or(Progress::Failed);
        }
        match latest {
            Progress::Failed => {}
            Progress::Verified(0) => {}
            Progress::Verified(size) if size <= PART as u64 => self.put_small(digest, &path, file, size, replace).await,
            _ => self.put_parts(digest, &path, file, latest, progress).await,
        }
    }

    async fn put_small(&self, digest: &Digest, path: &Path, file: Arc<std::fs::File>, size: u64, replace: bool) {
        let Some(bytes) = read_part(file, 0, size as usize).await else { return };
        let mode = if replace { PutMode::Overwrite } else { PutMode::Create };
        match bounded(self.inner.part_time, self.inner.store.put_opts(path, bytes.into(), mode.into())).await {
            // Another node (or cluster) uploaded it first: the same bytes, by construction.
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => self.uploaded(digest, size),
            Err(e) => {
                self.inner.metrics.bucket_abandoned.inc();
                self.trip("upload", &e);
            }
        }
    }

    async fn put_parts(
        &self,
        digest: &Digest,
        path: &Path,
        file: Arc<std::fs::File>,
        mut latest: Progress,
        mut progress: impl futures_util::Stream<Item = Progress> + Unpin + Send,
    ) {
        let _turn = self.inner.uploads.acquire().await.expect("the upload semaphore is never closed");
        let mut upload = match bounded(STALL, self.inner.store.put_multipart(path)).await {
            Ok(u) => u,
            Err(e) => return self.trip("upload", &e),
        };
        // The upload is kept (not handed to a writer) so that it can be aborted whatever step times out.
        // Spawned, so that parts go up while this task waits for the fill.
        let mut parts = tokio::task::JoinSet::new();
        let mut sent = 0u64;
        let stop = loop {
            let (ready, verified) = match latest {
                Progress::Written(n) => (n, None),
                Progress::Verified(size) => (size, Some(size)),
                // The fill failed (or was abandoned): these bytes must never become an object.
                Progress::Failed => break Stop::FillFailed,
            };
            // Whole parts while the fill goes on; the tail once it is verified.
            let until = if verified.is_some() { ready } else { ready - ready % PART as u64 };
            let mut stop = None;
            while sent < until && stop.is_none() {
                if let Err(e) = self.settle(&mut parts, PARTS_IN_FLIGHT - 1).await {
                    stop = Some(Stop::Bucket(e));
                    break;
                }
                let n = (until - sent).min(PART as u64) as usize;
                match read_part(file.clone(), sent, n).await {
                    Some(buf) => drop(parts.spawn(upload.put_part(buf.into()))),
                    None => stop = Some(Stop::FileUnreadable),
                }
                sent += n as u64;
            }
            if let Some(stop) = stop {
                break stop;
            }
            if let Some(size) = verified {
                let done = match self.settle(&mut parts, 0).await {
                    Ok(()) => bounded(self.inner.part_time, upload.complete()).await.map(drop),
                    Err(e) => Err(e),
                };
                match done {
                    Ok(()) => return self.uploaded(digest, size),
                    Err(e) => break Stop::Bucket(e),
                }
            }
            latest = progress.next().await.unwrap_or(Progress::Failed);
        };
        // Aborted, so no unfinished multipart upload is left (and billed).
        parts.shutdown().await;
        let _ = bounded(STALL, upload.abort()).await;
        match stop {
            Stop::Bucket(e) => {
                self.inner.metrics.bucket_abandoned.inc();
                self.trip("upload", &e);
            }
            Stop::FileUnreadable => tracing::warn!(%digest, "bucket upload aborted: the blob's file could not be read"),
            Stop::FillFailed => {
                tracing::info!(%digest, "bucket upload aborted: the fill did not end with a verified blob")
            }
        }
    }

    /// Waits until at most `keep` parts are in flight, each within the part bound.
    async fn settle(
        &self,
        parts: &mut tokio::task::JoinSet<Result<(), object_store::Error>>,
        keep: usize,
    ) -> Result<(), object_store::Error> {
        while parts.len() > keep {
            let next = async {
                match parts.join_next().await {
                    Some(Ok(done)) => done,
                    Some(Err(e)) => Err(object_store::Error::Generic { store: "S3", source: Box::new(e) }),
                    None => Ok(()),
                }
            };
            bounded(self.inner.part_time, next).await?;
        }
        Ok(())
    }

    /// A manifest by digest and its media type (kept as the object's `Content-Type`), `None` when the bucket
    /// does not hold it (or its copy is larger than any manifest wharf accepts). Not verified here: the
    /// caller checks the digest, as with any source.
    pub async fn manifest(&self, digest: &Digest) -> Option<(String, Bytes)> {
        if !self.is_usable() || self.is_corrupt(digest) {
            return None;
        }
        let path = self.path_in("manifests", digest);
        let got = self.get(&path, GetOptions::default()).await.ok()??;
        if got.meta.size > upstream::MAX_MANIFEST_SIZE as u64 {
            return None;
        }
        let media_type = got.attributes.get(&Attribute::ContentType).map(|v| v.to_string()).unwrap_or_default();
        match bounded(STALL, got.bytes()).await {
            Ok(bytes) => {
                self.count("hit");
                self.inner
                    .metrics
                    .bucket_bytes
                    .get_or_create(&ReasonLabel { reason: "read" })
                    .inc_by(bytes.len() as u64);
                Some((media_type, bytes))
            }
            Err(e) => {
                self.trip("read", &e);
                None
            }
        }
    }

    /// Stores a verified manifest by digest with its media type, in one create-only request: an object that
    /// exists already holds the same bytes (unless its copy failed verification: then it is replaced). Runs
    /// in the background; a failure only opens the breaker.
    pub async fn put_manifest(&self, digest: &Digest, media_type: &str, bytes: Bytes) {
        if !self.is_usable() {
            return;
        }
        let path = self.path_in("manifests", digest);
        let size = bytes.len() as u64;
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, media_type.to_owned().into());
        let mode = if self.is_corrupt(digest) { PutMode::Overwrite } else { PutMode::Create };
        let options = PutOptions { mode, attributes, ..PutOptions::default() };
        match bounded(STALL, self.inner.store.put_opts(&path, bytes.into(), options)).await {
            Ok(_) => self.uploaded(digest, size),
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => self.trip("upload", &e),
        }
    }

    fn uploaded(&self, digest: &Digest, size: u64) {
        self.inner.corrupt.lock().unwrap().remove(digest);
        self.inner.metrics.bucket_bytes.get_or_create(&ReasonLabel { reason: "written" }).inc_by(size);
        tracing::info!(%digest, size, "uploaded to the bucket");
    }
}

/// Why a multipart upload stopped short of completion.
enum Stop {
    /// The fill failed or was abandoned.
    FillFailed,
    /// The fill's file could not be read back (not the bucket's fault).
    FileUnreadable,
    /// The bucket failed or did not answer within its bound.
    Bucket(object_store::Error),
}

/// Where the fill an upload follows stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The first `n` bytes of the file are final (written in order; not yet verified).
    Written(u64),
    /// The blob is verified and committed: `size` bytes.
    Verified(u64),
    /// The fill failed or was abandoned.
    Failed,
}

/// `n` bytes of `file` from `offset`, read on the blocking pool.
async fn read_part(file: Arc<std::fs::File>, offset: u64, n: usize) -> Option<Bytes> {
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; n];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, offset).map(|()| Bytes::from(buf))
    })
    .await;
    read.ok()?.ok()
}

/// How a bound's error starts (and how it is told apart from the bucket's own errors).
const NO_ANSWER: &str = "no answer within";

/// `work`, or an error past `limit`: no bucket call may hold its caller (or an upload task) forever.
async fn bounded<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, object_store::Error>>,
) -> Result<T, object_store::Error> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(object_store::Error::Generic { store: "S3", source: format!("{NO_ANSWER} {limit:?}").into() })
    })
}
