//! Metadata in sled: tags (with when they were checked), blob sizes, and which repositories reference which blobs.
//! Only a cache of what the files say: a missing or corrupt database is rebuilt from the blob tree. The only `use sled`.

use crate::oci::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Handle to the metadata database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Meta {
    db: sled::Db,
    tags: sled::Tree,
    blobs: sled::Tree,
    /// `<registry>/<repo>\0<digest>`: which repositories a blob was fetched for.
    refs: sled::Tree,
    /// `<last access, big-endian u64><digest>`: the LRU order without a scan of `blobs`.
    atime: sled::Tree,
    /// `<pin name>\0<digest>`: blobs and manifests the warm list keeps.
    pins: sled::Tree,
    /// The last access stamp handed out (see [`Meta::stamp`]).
    last_stamp: Arc<AtomicU64>,
}

/// Whether the database failed, shared by the cell and the watch that repairs it. sled turns its first
/// write error (a full disk, an I/O error) into an error for every later write of that handle, so a failure
/// is reported once, to whoever repairs the database (a new handle), which then clears it.
#[derive(Debug, Default)]
pub struct Health {
    failed: AtomicBool,
    first_error: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Health {
    /// Records a database error; the first one since the last [`Health::clear`] wakes [`Health::failed`].
    pub fn report(&self, error: &sled::Error) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            *self.first_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
            self.notify.notify_one();
        }
    }

    /// Whether an error was reported since the last clear.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Waits until an error is reported (returns at once if one was reported and not yet waited for).
    pub async fn failed(&self) {
        self.notify.notified().await;
    }

    /// The first error reported since the last clear.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The database works again (a new handle replaced the failed one).
    pub fn clear(&self) {
        *self.first_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.failed.store(false, Ordering::SeqCst);
    }
}

/// What a tag pointed to when it was last checked upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagEntry {
    /// Manifest digest.
    pub digest: Digest,
    /// Manifest media type, exactly as the upstream sent it.
    pub media_type: String,
    /// Manifest size in bytes.
    pub size: u64,
    /// Unix seconds of the last successful upstream check.
    pub checked_at: u64,
}

/// What is recorded per blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Size in bytes.
    pub size: u64,
    /// Unix seconds when it was stored.
    pub stored_at: u64,
    /// Unix milliseconds when a client was last served it (flushed in batches).
    #[serde(default)]
    pub last_access: u64,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    now_millis() / 1000
}

/// Milliseconds since the Unix epoch: access times use them, so LRU order holds within a second.
pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn atime_key(at: u64, digest: &Digest) -> Vec<u8> {
    let mut k = at.to_be_bytes().to_vec();
    k.extend_from_slice(digest.to_string().as_bytes());
    k
}

fn decode<T: serde::de::DeserializeOwned>(v: &[u8]) -> Option<T> {
    serde_json::from_slice(v).ok()
}

impl Meta {
    /// Opens the database at `path`. A corrupt database is moved aside and a new one created.
    /// Returns whether the database is new (and so must be rebuilt from the blob tree).
    pub fn open(path: &Path) -> io::Result<(Meta, bool)> {
        let existed = path.join("db").exists();
        let db = match sled::open(path) {
            Ok(db) => db,
            // Another process holds the database: never treat a live cache as corrupt.
            // sled wraps the flock error as text: "could not acquire lock on …: Os { code: 11, … }".
            Err(sled::Error::Io(e))
                if e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock") =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another wharf process", path.display()),
                ));
            }
            // A full disk is no corruption: the caller retries once there is room, keeping tags and pins.
            Err(sled::Error::Io(e)) if super::is_disk_full(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "metadata database unreadable; rebuilding it");
                std::fs::remove_dir_all(path)?;
                sled::open(path).map_err(io::Error::other)?
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(io::Error::other);
        let meta = Meta {
            tags: tree("tags")?,
            blobs: tree("blobs")?,
            refs: tree("refs")?,
            atime: tree("atime")?,
            pins: tree("pins")?,
            db,
            last_stamp: Arc::default(),
        };
        let fresh = !existed || meta.db.get("initialized").map_err(io::Error::other)?.is_none();
        Ok((meta, fresh))
    }

    /// An access time: wall-clock milliseconds, but strictly increasing within the process, so LRU order is
    /// the order of events even when several land in the same millisecond.
    pub fn stamp(&self) -> u64 {
        let now = now_millis();
        let prev = self.last_stamp.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(now.max(p + 1)));
        let prev = prev.unwrap_or_else(|p| p);
        now.max(prev + 1)
    }

    /// Marks a rebuild complete, so the next start-up trusts the database.
    pub fn mark_initialized(&self) -> Result<(), sled::Error> {
        self.db.insert("initialized", &b"1"[..])?;
        Ok(())
    }

    /// Makes the blob records match `files` (every committed blob and its size): sled writes its log in the
    /// background, so a crash can lose the last records, and a blob file nobody records is never evicted nor
    /// counted against the budget. Records missing or wrong are rewritten (accessed now), records without a
    /// file dropped. Returns how many were (rewritten, dropped).
    pub fn reconcile_blobs(&self, files: &[(Digest, u64)]) -> Result<(usize, usize), sled::Error> {
        let on_disk: HashMap<String, u64> = files.iter().map(|(d, size)| (d.to_string(), *size)).collect();
        let mut gone = Vec::new();
        for key in self.blobs.iter().keys() {
            let key = key?;
            let name = String::from_utf8_lossy(&key);
            if !on_disk.contains_key(name.as_ref())
                && let Ok(digest) = name.parse::<Digest>()
            {
                gone.push(digest);
            }
        }
        for digest in &gone {
            self.remove_blob(digest)?;
        }
        let mut rewritten = 0;
        for (digest, size) in files {
            if self.blob(digest)?.is_none_or(|e| e.size != *size) {
                self.record_blob(digest, *size, None)?;
                rewritten += 1;
            }
        }
        Ok((rewritten, gone.len()))
    }

    /// The entry for a tag key (see `cache::manifests` for the key format).
    pub fn tag(&self, key: &str) -> Result<Option<TagEntry>, sled::Error> {
        Ok(self.tags.get(key)?.and_then(|v| decode(&v)))
    }

    /// Stores a tag entry.
    pub fn put_tag(&self, key: &str, entry: &TagEntry) -> Result<(), sled::Error> {
        self.tags.insert(key, serde_json::to_vec(entry).expect("tag entries serialize"))?;
        Ok(())
    }

    /// Forgets a tag the upstream no longer has.
    pub fn remove_tag(&self, key: &str) -> Result<(), sled::Error> {
        self.tags.remove(key)?;
        Ok(())
    }

    /// Every tag entry with its key.
    pub fn tags(&self) -> Result<Vec<(String, TagEntry)>, sled::Error> {
        let mut out = Vec::new();
        for item in self.tags.iter() {
            let (k, v) = item?;
            if let Some(e) = decode(&v) {
                out.push((String::from_utf8_lossy(&k).into_owned(), e));
            }
        }
        Ok(out)
    }

    /// Records a committed blob (accessed now) and, when known, a repository that references it.
    pub fn record_blob(&self, digest: &Digest, size: u64, repo: Option<&str>) -> Result<(), sled::Error> {
        let now = self.stamp();
        if let Some(old) = self.blob(digest)? {
            self.atime.remove(atime_key(old.last_access, digest))?;
        }
        let entry = BlobEntry { size, stored_at: now / 1000, last_access: now };
        self.blobs.insert(digest.to_string(), serde_json::to_vec(&entry).expect("blob entries serialize"))?;
        self.atime.insert(atime_key(now, digest), &[][..])?;
        if let Some(repo) = repo {
            self.refs.insert(format!("{repo}\0{digest}"), &[][..])?;
        }
        Ok(())
    }

    /// Records that `repo` (`<registry>/<repo>`) references `digest` (a blob or a manifest).
    pub fn add_ref(&self, repo: &str, digest: &Digest) -> Result<(), sled::Error> {
        self.refs.insert(format!("{repo}\0{digest}"), &[][..]).map(drop)
    }

    /// Whether `repo` is known to reference `digest`.
    pub fn has_ref(&self, repo: &str, digest: &Digest) -> Result<bool, sled::Error> {
        self.refs.contains_key(format!("{repo}\0{digest}"))
    }

    /// The recorded entry for a blob.
    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobEntry>, sled::Error> {
        Ok(self.blobs.get(digest.to_string())?.and_then(|v| decode(&v)))
    }

    /// Moves blobs to their new last-access times (a batch collected in memory).
    pub fn touch(&self, accessed: &[(Digest, u64)]) -> Result<(), sled::Error> {
        for (digest, at) in accessed {
            let Some(mut entry) = self.blob(digest)? else { continue };
            if entry.last_access >= *at {
                continue;
            }
            self.atime.remove(atime_key(entry.last_access, digest))?;
            entry.last_access = *at;
            self.blobs.insert(digest.to_string(), serde_json::to_vec(&entry).expect("blob entries serialize"))?;
            self.atime.insert(atime_key(*at, digest), &[][..])?;
        }
        Ok(())
    }

    /// Forgets a blob (after its file was removed).
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), sled::Error> {
        if let Some(old) = self.blob(digest)? {
            self.atime.remove(atime_key(old.last_access, digest))?;
        }
        self.blobs.remove(digest.to_string())?;
        let suffix = format!("\0{digest}");
        for item in self.refs.iter().keys() {
            let k = item?;
            if k.ends_with(suffix.as_bytes()) {
                self.refs.remove(k)?;
            }
        }
        Ok(())
    }

    /// Blobs from least to most recently used: `(last access, digest, size)`.
    pub fn lru(&self) -> impl Iterator<Item = Result<(u64, Digest, u64), sled::Error>> + '_ {
        self.atime.iter().keys().filter_map(move |k| {
            let k = match k {
                Ok(k) => k,
                Err(e) => return Some(Err(e)),
            };
            let at = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
            let digest: Digest = std::str::from_utf8(&k[8..]).ok()?.parse().ok()?;
            let size = match self.blob(&digest) {
                Ok(Some(e)) => e.size,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            Some(Ok((at, digest, size)))
        })
    }

    /// Sum of recorded blob sizes and their count.
    pub fn blob_totals(&self) -> Result<(u64, u64), sled::Error> {
        let (mut bytes, mut count) = (0, 0);
        for item in self.blobs.iter().values() {
            if let Some(e) = decode::<BlobEntry>(&item?) {
                bytes += e.size;
                count += 1;
            }
        }
        Ok((bytes, count))
    }

    /// Replaces the digests pinned under `name`.
    pub fn set_pins(&self, name: &str, digests: &[Digest]) -> Result<(), sled::Error> {
        let prefix = format!("{name}\0");
        for k in self.pins.scan_prefix(prefix.as_bytes()).keys() {
            self.pins.remove(k?)?;
        }
        for d in digests {
            self.pins.insert(format!("{prefix}{d}"), &[][..])?;
        }
        Ok(())
    }

    /// Every pin: name → digests.
    pub fn pins(&self) -> Result<BTreeMap<String, Vec<Digest>>, sled::Error> {
        let mut out: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
        for k in self.pins.iter().keys() {
            let k = k?;
            let text = String::from_utf8_lossy(&k);
            if let Some((name, d)) = text.split_once('\0')
                && let Ok(d) = d.parse()
            {
                out.entry(name.to_owned()).or_default().push(d);
            }
        }
        Ok(out)
    }

    /// Repositories that blobs were fetched for: `<registry>/<repo>`.
    pub fn repositories(&self) -> Result<BTreeSet<String>, sled::Error> {
        let mut out = BTreeSet::new();
        for k in self.refs.iter().keys() {
            let k = k?;
            if let Some(repo) = String::from_utf8_lossy(&k).split('\0').next() {
                out.insert(repo.to_owned());
            }
        }
        Ok(out)
    }

    /// Writes pending changes to disk (sled also does this in the background).
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        Ok(())
    }
}

/// The cache's handle to its metadata, which survives a failed database. sled turns its first failed write
/// into an error for every later one, so every error met through the cell is reported to its [`Health`], and
/// the failed handle is replaced with a new one ([`MetaCell::reopen`]); meanwhile writes are dropped (the
/// blob tree is the truth, and a reopen reconciles with it) and reads answer from the failed handle where
/// sled still can.
#[derive(Debug)]
pub struct MetaCell {
    current: std::sync::RwLock<Option<Meta>>,
    health: Arc<Health>,
    path: std::path::PathBuf,
}

/// What callers get while no handle is open (between dropping a failed one and opening its replacement).
fn unavailable() -> sled::Error {
    sled::Error::Io(io::Error::other("metadata database is being reopened"))
}

impl MetaCell {
    /// Wraps `meta`, opened at `path`; errors are reported to `health`.
    pub fn new(meta: Meta, path: &Path, health: Arc<Health>) -> MetaCell {
        MetaCell { current: std::sync::RwLock::new(Some(meta)), health, path: path.to_path_buf() }
    }

    /// The open handle. Pass what it answers through [`MetaCell::seen`].
    pub fn handle(&self) -> Result<Meta, sled::Error> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(unavailable)
    }

    /// Passes a result of the handle on, reporting an error to the health.
    pub fn seen<T>(&self, result: Result<T, sled::Error>) -> Result<T, sled::Error> {
        if let Err(e) = &result {
            self.health.report(e);
        }
        result
    }

    /// Shared failure state.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Whether the database works: no failure reported, and a handle open.
    pub fn is_healthy(&self) -> bool {
        !self.health.is_failed() && self.current.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// A read through the handle, reported if it fails.
    fn read<T>(&self, read: impl FnOnce(&Meta) -> Result<T, sled::Error>) -> Result<T, sled::Error> {
        let meta = self.handle()?;
        self.seen(read(&meta))
    }

    /// A write that the files can stand in for: done if possible, else dropped (the failure is reported to
    /// the health, which logs and repairs it once, rather than failing each request).
    fn best_effort(&self, write: impl FnOnce(&Meta) -> Result<(), sled::Error>) -> Result<(), sled::Error> {
        if let Err(e) = self.read(write) {
            tracing::debug!(error = %e, "metadata write dropped");
        }
        Ok(())
    }

    /// See [`Meta::stamp`]; wall-clock milliseconds while no handle is open.
    pub fn stamp(&self) -> u64 {
        self.current.read().unwrap_or_else(|e| e.into_inner()).as_ref().map_or_else(now_millis, Meta::stamp)
    }

    /// See [`Meta::tag`]; unknown when the database cannot answer (the upstream is asked instead).
    pub fn tag(&self, key: &str) -> Result<Option<TagEntry>, sled::Error> {
        Ok(self.read(|m| m.tag(key)).unwrap_or(None))
    }

    /// See [`Meta::put_tag`] (best effort).
    pub fn put_tag(&self, key: &str, entry: &TagEntry) -> Result<(), sled::Error> {
        self.best_effort(|m| m.put_tag(key, entry))
    }

    /// See [`Meta::remove_tag`] (best effort).
    pub fn remove_tag(&self, key: &str) -> Result<(), sled::Error> {
        self.best_effort(|m| m.remove_tag(key))
    }

    /// See [`Meta::tags`].
    pub fn tags(&self) -> Result<Vec<(String, TagEntry)>, sled::Error> {
        self.read(Meta::tags)
    }

    /// See [`Meta::record_blob`] (best effort: a reopen records every blob file).
    pub fn record_blob(&self, digest: &Digest, size: u64, repo: Option<&str>) -> Result<(), sled::Error> {
        self.best_effort(|m| m.record_blob(digest, size, repo))
    }

    /// See [`Meta::add_ref`] (best effort: an unrecorded reference is asked of the upstream again).
    pub fn add_ref(&self, repo: &str, digest: &Digest) -> Result<(), sled::Error> {
        self.best_effort(|m| m.add_ref(repo, digest))
    }

    /// See [`Meta::has_ref`]; not known when the database cannot answer (the upstream is asked instead).
    pub fn has_ref(&self, repo: &str, digest: &Digest) -> Result<bool, sled::Error> {
        Ok(self.read(|m| m.has_ref(repo, digest)).unwrap_or(false))
    }

    /// See [`Meta::touch`] (best effort: access times only order eviction).
    pub fn touch(&self, accessed: &[(Digest, u64)]) -> Result<(), sled::Error> {
        self.best_effort(|m| m.touch(accessed))
    }

    /// See [`Meta::remove_blob`] (best effort, after the file is gone: a reopen drops records without files).
    pub fn remove_blob(&self, digest: &Digest) -> Result<(), sled::Error> {
        self.best_effort(|m| m.remove_blob(digest))
    }

    /// See [`Meta::set_pins`]. Not best effort: lost pins would let eviction take what the warm list keeps.
    pub fn set_pins(&self, name: &str, digests: &[Digest]) -> Result<(), sled::Error> {
        self.read(|m| m.set_pins(name, digests))
    }

    /// See [`Meta::pins`].
    pub fn pins(&self) -> Result<BTreeMap<String, Vec<Digest>>, sled::Error> {
        self.read(Meta::pins)
    }

    /// See [`Meta::repositories`].
    pub fn repositories(&self) -> Result<BTreeSet<String>, sled::Error> {
        self.read(Meta::repositories)
    }

    /// See [`Meta::flush`]: sled writes in the background and reports a failed write only to later calls, so
    /// this is how a failure is noticed when nothing else writes.
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.read(Meta::flush)
    }

    /// Replaces the handle with a new one on the same directory (rebuilt when unreadable), caught up with
    /// `files` (every committed blob), and clears the failure once a flush proves writes land again.
    /// Returns the new handle's (bytes, count) of recorded blobs. Blocking.
    pub fn reopen(&self, files: &[(Digest, u64)]) -> io::Result<(u64, u64)> {
        // sled locks its files until every handle is dropped: ours goes first, and a caller still holding a
        // clone makes the open below fail with `WouldBlock` (retried later).
        drop(self.current.write().unwrap_or_else(|e| e.into_inner()).take());
        let (meta, fresh) = Meta::open(&self.path)?;
        let attempt = || -> Result<(u64, u64), sled::Error> {
            meta.reconcile_blobs(files)?;
            if fresh {
                meta.mark_initialized()?;
            }
            meta.flush()?;
            meta.blob_totals()
        };
        let totals = attempt().map_err(io::Error::other)?;
        self.health.clear();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(meta);
        Ok(totals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_database_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("db"), b"garbage that is not a sled database").unwrap();
        std::fs::write(path.join("conf"), b"garbage").unwrap();
        let (meta, fresh) = Meta::open(&path).unwrap();
        assert!(fresh);
        let d = Digest::sha256_of(b"x");
        meta.record_blob(&d, 1, Some("r/e/p")).unwrap();
        assert_eq!(meta.blob(&d).unwrap().unwrap().size, 1);
    }

    #[test]
    fn lru_order_follows_touches_and_pins_replace() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, _) = Meta::open(&dir.path().join("meta")).unwrap();
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        meta.record_blob(&a, 10, Some("reg/x")).unwrap();
        meta.record_blob(&b, 20, None).unwrap();
        let far = now_millis() + 100_000;
        meta.touch(&[(a.clone(), far)]).unwrap();
        let order: Vec<_> = meta.lru().map(|r| r.unwrap().1).collect();
        assert_eq!(order, vec![b.clone(), a.clone()]);
        assert_eq!(meta.blob_totals().unwrap(), (30, 2));
        meta.remove_blob(&a).unwrap();
        assert_eq!(meta.lru().count(), 1);
        assert!(meta.repositories().unwrap().is_empty());

        meta.set_pins("img", &[a.clone(), b.clone()]).unwrap();
        meta.set_pins("img", std::slice::from_ref(&b)).unwrap();
        assert_eq!(meta.pins().unwrap()["img"], vec![b]);
    }

    #[test]
    fn reconcile_records_lost_blobs_and_drops_records_without_files() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, _) = Meta::open(&dir.path().join("meta")).unwrap();
        let (kept, lost, ghost) = (Digest::sha256_of(b"k"), Digest::sha256_of(b"l"), Digest::sha256_of(b"g"));
        meta.record_blob(&kept, 10, Some("reg/x")).unwrap();
        meta.record_blob(&ghost, 30, Some("reg/x")).unwrap();
        let files = [(kept.clone(), 10), (lost.clone(), 20)];
        assert_eq!(meta.reconcile_blobs(&files).unwrap(), (1, 1));
        assert_eq!(meta.blob_totals().unwrap(), (30, 2));
        assert!(meta.blob(&ghost).unwrap().is_none());
        assert_eq!(meta.lru().count(), 2, "the recovered blob is evictable");
        assert_eq!(meta.reconcile_blobs(&files).unwrap(), (0, 0));
    }

    #[test]
    fn initialized_database_is_not_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let (meta, fresh) = Meta::open(&path).unwrap();
            assert!(fresh);
            meta.mark_initialized().unwrap();
            meta.db.flush().unwrap();
        }
        // sled releases its file lock from a background thread after the drop, with no signal to wait on.
        let reopened = (0..200).find_map(|_| match Meta::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
            other => Some(other),
        });
        let (_, fresh) = reopened.expect("the lock is released").unwrap();
        assert!(!fresh);
    }

    #[test]
    fn a_cell_drops_writes_while_closed_and_reopens_caught_up_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let health = Arc::new(Health::default());
        let (meta, _) = Meta::open(&path).unwrap();
        let cell = MetaCell::new(meta, &path, health.clone());
        let (a, b) = (Digest::sha256_of(b"a"), Digest::sha256_of(b"b"));
        cell.record_blob(&a, 1, Some("reg/x")).unwrap();
        let entry = TagEntry { digest: a.clone(), media_type: "m".into(), size: 1, checked_at: 0 };
        cell.put_tag("reg/x:t#index", &entry).unwrap();
        assert_eq!(cell.tag("reg/x:t#index").unwrap(), Some(entry.clone()));

        health.report(&sled::Error::Unsupported("a write failed".into()));
        assert!(!cell.is_healthy());
        assert_eq!(health.first_error().as_deref(), Some("Unsupported: a write failed"));
        // With no handle open: writes are dropped without failing the request, reads that can be asked of
        // the upstream say "unknown", the others fail.
        drop(cell.current.write().unwrap().take());
        assert!(cell.put_tag("reg/x:u#index", &entry).is_ok());
        assert!(cell.record_blob(&b, 2, None).is_ok());
        assert_eq!(cell.tag("reg/x:t#index").unwrap(), None);
        assert!(!cell.has_ref("reg/x", &a).unwrap());
        assert!(cell.tags().is_err());

        // sled releases its lock from a background thread after the drop: retried, as the watch task does.
        let files = [(a.clone(), 1), (b.clone(), 2)];
        let reopened = (0..200).find_map(|_| match cell.reopen(&files) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                None
            }
            other => Some(other),
        });
        assert_eq!(reopened.expect("the lock is released").unwrap(), (3, 2), "caught up with the files");
        assert!(cell.is_healthy());
        assert_eq!(health.first_error(), None);
        assert_eq!(cell.tag("reg/x:t#index").unwrap(), Some(entry), "what was written before the failure stays");
        assert_eq!(cell.handle().unwrap().blob(&b).unwrap().map(|e| e.size), Some(2));
    }
}
