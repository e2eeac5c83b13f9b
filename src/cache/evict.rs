//! Keeping the disk within bounds, the way the kubelet's image GC does: above the high watermark (or over the
//! byte budget) evict least recently used blobs until below the low one. Never a pinned blob, one being filled
//! or served, or one used within `min_age`; optionally anything idle longer than `max_idle_age`.
//! Manifests and tags that point only to evicted blobs go too.

use super::meta::now_millis;
use super::{Cache, Error};
use crate::oci::Digest;
use crate::oci::manifest::References;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Disk usage and bounds, for the admin API and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    /// Bytes of committed blobs.
    pub blob_bytes: u64,
    /// The byte budget (0: none).
    pub max_bytes: u64,
    /// Size of the cache's filesystem.
    pub filesystem_bytes: u64,
    /// Bytes in use on it (by anything).
    pub filesystem_used_bytes: u64,
    /// High watermark, percent.
    pub high_watermark: u8,
    /// Low watermark, percent.
    pub low_watermark: u8,
    /// Fills running now.
    pub fills_in_flight: usize,
}

/// What one eviction pass did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Blobs removed.
    pub evicted_blobs: Vec<Digest>,
    /// Bytes they held.
    pub evicted_bytes: u64,
    /// Manifests removed because every blob they name is gone.
    pub evicted_manifests: usize,
    /// Bytes that had to go to get under the bounds (0: no pressure).
    pub needed_bytes: u64,
}

/// Why a single digest could not be evicted on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictRefusal {
    /// The warm list pins it.
    Pinned,
    /// A fill or a response is using it.
    InUse,
    /// Not cached.
    NotCached,
}

impl Cache {
    /// Current usage and bounds (refreshes the disk gauges).
    pub fn usage(&self) -> Usage {
        let s = &self.shared;
        let (fs_total, fs_used) = s.store.filesystem().unwrap_or((0, 0));
        let blob_bytes = s.bytes.load(Ordering::Relaxed);
        s.metrics.cache_bytes.set(blob_bytes as i64);
        if fs_total > 0 {
            s.metrics.filesystem_used_ratio.set(fs_used as f64 / fs_total as f64);
        }
        Usage {
            blob_bytes,
            max_bytes: s.settings.max_bytes,
            filesystem_bytes: fs_total,
            filesystem_used_bytes: fs_used,
            high_watermark: s.settings.high_watermark,
            low_watermark: s.settings.low_watermark,
            fills_in_flight: s.inflight.len(),
        }
    }

    /// Writes the batched access times to the metadata.
    fn flush_access(&self) -> Result<(), Error> {
        let batch: Vec<(Digest, u64)> = self.shared.accessed.lock().unwrap().drain().collect();
        Ok(self.shared.meta.touch(&batch)?)
    }

    /// Bytes that must go now: over the budget, or the filesystem above the high watermark. Each is
    /// brought down to its low mark so eviction does not run again at the next fill.
    pub(super) fn needed_bytes(&self, incoming: u64) -> u64 {
        let s = &self.shared;
        let (high, low) = (u64::from(s.settings.high_watermark), u64::from(s.settings.low_watermark));
        // Saturating: `incoming` is the upstream's announced size.
        let used = s.bytes.load(Ordering::Relaxed).saturating_add(incoming);
        let mut need = 0;
        let budget = s.settings.max_bytes;
        if budget > 0 && used > budget {
            need = used - budget * low / high.max(1);
        }
        if let Ok((total, fs_used)) = s.store.filesystem()
            && total > 0
            && fs_used.saturating_add(incoming).saturating_mul(100) > total.saturating_mul(high)
        {
            need = need.max(fs_used.saturating_add(incoming).saturating_sub(total * low / 100));
        }
        need
    }

    fn protected(&self) -> Result<HashSet<Digest>, Error> {
        let mut keep: HashSet<Digest> = self.shared.meta.pins()?.into_values().flatten().collect();
        keep.extend(self.shared.serving.lock().unwrap().keys().cloned());
        Ok(keep)
    }

    /// One eviction pass, making room for `incoming` more bytes. Blocking: run on the blocking pool.
    pub fn gc_blocking(&self, incoming: u64) -> Result<GcReport, Error> {
        let _pass = self.shared.gc_lock.lock().unwrap();
        self.flush_access()?;
        let s = &self.shared;
        let mut report = GcReport { needed_bytes: self.needed_bytes(incoming), ..Default::default() };
        let now = now_millis();
        let idle_before = (s.settings.max_idle_age > 0).then(|| now.saturating_sub(s.settings.max_idle_age * 1000));
        // No minimum age at 0: access stamps may run ahead of the clock (they are strictly increasing), so a
        // cut-off at `now` could stop a pass at a blob used in this very millisecond.
        let min_age_before = (s.settings.min_age > 0).then(|| now.saturating_sub(s.settings.min_age * 1000));
        let keep = self.protected()?;
        let meta = s.meta.handle()?;
        for item in meta.lru() {
            let (last_access, digest, size) = s.meta.seen(item)?;
            let idle = idle_before.is_some_and(|t| last_access < t);
            if report.evicted_bytes >= report.needed_bytes && !idle {
                break;
            }
            if !idle && min_age_before.is_some_and(|t| last_access > t) {
                break; // Everything after this was used more recently still.
            }
            if keep.contains(&digest) || s.inflight.get(&digest).is_some() {
                continue;
            }
            self.remove_blob(&digest, size)?;
            tracing::info!(%digest, size, last_access, "evicted blob");
            report.evicted_bytes += size;
            report.evicted_blobs.push(digest);
        }
        if !report.evicted_blobs.is_empty() {
            report.evicted_manifests = self.drop_orphan_manifests(&keep)?;
        }
        self.usage();
        Ok(report)
    }

    /// Removes manifests whose every blob (or, for an index, every child manifest) is gone, and the tags
    /// pointing to them.
    fn drop_orphan_manifests(&self, keep: &HashSet<Digest>) -> Result<usize, Error> {
        let s = &self.shared;
        let mut removed = HashSet::new();
        // Image manifests first, then indexes whose children were just removed.
        for pass in 0..2 {
            for digest in s.store.scan_manifests()? {
                if keep.contains(&digest) || removed.contains(&digest) {
                    continue;
                }
                let Some((_, bytes)) = s.store.read_manifest(&digest)? else { continue };
                let Some(refs) = References::parse(&bytes) else { continue };
                let orphan = if pass == 0 {
                    let blobs: Vec<_> = refs.blobs().collect();
                    !blobs.is_empty() && blobs.iter().all(|b| !s.store.has_blob(&b.digest))
                } else {
                    !refs.manifests.is_empty() && refs.manifests.iter().all(|m| !s.store.has_manifest(&m.digest))
                };
                if orphan {
                    s.store.remove_manifest(&digest)?;
                    removed.insert(digest);
                }
            }
        }
        self.remove_tags_to(&removed)?;
        Ok(removed.len())
    }

    /// Deletes a committed blob and everything that accounts for it.
    fn remove_blob(&self, digest: &Digest, size: u64) -> Result<(), Error> {
        let s = &self.shared;
        s.store.remove_blob(digest)?;
        s.meta.remove_blob(digest)?;
        let _ = s.bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(size)));
        s.metrics.evictions.inc();
        s.metrics.evicted_bytes.inc_by(size);
        Ok(())
    }

    /// Forgets the tags that point to any of `manifests` (whose files are gone).
    fn remove_tags_to(&self, manifests: &HashSet<Digest>) -> Result<(), Error> {
        for (key, entry) in self.shared.meta.tags()? {
            if manifests.contains(&entry.digest) {
                self.shared.meta.remove_tag(&key)?;
            }
        }
        Ok(())
    }

    /// Runs an eviction pass on the blocking pool.
    pub async fn gc(&self, incoming: u64) -> Result<GcReport, Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.gc_blocking(incoming)).await?
    }

    /// Removes one blob or manifest now (admin), unless pinned or in use.
    pub async fn evict(&self, digest: &Digest) -> Result<Result<u64, EvictRefusal>, Error> {
        let this = self.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || {
            let s = &this.shared;
            if this.protected()?.contains(&digest) {
                let pinned = s.meta.pins()?.values().flatten().any(|d| *d == digest);
                return Ok(Err(if pinned { EvictRefusal::Pinned } else { EvictRefusal::InUse }));
            }
            if s.inflight.get(&digest).is_some() {
                return Ok(Err(EvictRefusal::InUse));
            }
            if s.store.has_manifest(&digest) {
                s.store.remove_manifest(&digest)?;
                this.remove_tags_to(&HashSet::from([digest]))?;
                return Ok(Ok(0));
            }
            let Some(size) = s.store.blob_size(&digest)? else { return Ok(Err(EvictRefusal::NotCached)) };
            this.remove_blob(&digest, size)?;
            this.usage();
            Ok(Ok(size))
        })
        .await?
    }

    /// Background eviction every `gc_interval` seconds until the tracker closes; also starts the metadata
    /// watch ([`Cache::spawn_meta_watch`]).
    pub fn spawn_gc_loop(&self, shutdown: tokio_util::sync::CancellationToken) {
        self.spawn_meta_watch(shutdown.clone());
        let this = self.clone();
        let every = Duration::from_secs(self.shared.settings.gc_interval.max(1));
        self.shared.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                match this.gc(0).await {
                    Ok(r) if !r.evicted_blobs.is_empty() => {
                        tracing::info!(blobs = r.evicted_blobs.len(), bytes = r.evicted_bytes, "eviction pass");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "eviction pass failed"),
                }
            }
        });
    }
}

impl Cache {
    /// Watches the metadata database until shutdown: checks a working one every few seconds (sled reports a
    /// failed background write only to later calls), and when it fails, logs and counts that once, reports
    /// not-ready, and reopens it every few seconds, once free space is above the reserve, until that works.
    pub fn spawn_meta_watch(&self, shutdown: tokio_util::sync::CancellationToken) {
        let this = self.clone();
        self.shared.tasks.spawn(async move {
            let health = this.shared.meta.health().clone();
            let metrics = this.shared.metrics.clone();
            let mut tick = tokio::time::interval(super::META_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = health.failed() => {}
                    _ = shutdown.cancelled() => return,
                }
                if !health.is_failed() {
                    let probe = this.clone();
                    let _ = tokio::task::spawn_blocking(move || probe.shared.meta.flush()).await;
                }
                if !health.is_failed() {
                    continue;
                }
                if !failing {
                    failing = true;
                    let error = health.first_error().unwrap_or_default();
                    tracing::error!(%error, "metadata database failed; serving from the blob files and reopening it \
                        once there is free space");
                    metrics.metadata_failures.inc();
                    metrics.metadata_degraded.set(1);
                }
                let repair = this.clone();
                match tokio::task::spawn_blocking(move || repair.reopen_meta()).await {
                    Ok(Ok(true)) => {
                        failing = false;
                        metrics.metadata_degraded.set(0);
                        tracing::info!("metadata database reopened and caught up with the blob tree");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "metadata database not reopened yet"),
                    Err(e) => tracing::debug!(error = %e, "metadata reopen task failed"),
                }
            }
        });
    }

    /// One attempt to replace a failed metadata handle: false while free space is below the reserve (a new
    /// handle would fail the same way). Blocking.
    fn reopen_meta(&self) -> Result<bool, Error> {
        let s = &self.shared;
        let (free, reserve) = s.store.free_and_reserve(s.settings.min_free_bytes)?;
        // Some room even with no reserve configured: sled writes whole buffers.
        if free < reserve.max(MIN_FREE_TO_REOPEN) {
            return Ok(false);
        }
        let files = s.store.scan_blobs()?;
        s.meta.reopen(&files)?;
        // A blob committed while the handle was being swapped had its record dropped: catch up once more, now
        // that every commit writes to the new handle.
        let again = s.store.scan_blobs()?;
        let meta = s.meta.handle()?;
        let (bytes, _) = s.meta.seen(meta.reconcile_blobs(&again).and_then(|_| meta.blob_totals()))?;
        s.bytes.store(bytes, Ordering::Relaxed);
        s.metrics.cache_bytes.set(bytes as i64);
        Ok(true)
    }
}

/// Free bytes needed before a failed metadata database is reopened, whatever the reserve.
const MIN_FREE_TO_REOPEN: u64 = 1024 * 1024;
