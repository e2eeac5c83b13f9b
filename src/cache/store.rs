//! The content-addressed file tree: `blobs/<algo>/<2 hex>/<hex>`, `manifests/<algo>/<2 hex>/<hex>`, `tmp/`.
//! The files are the truth. Everything lands through a temporary file, fsync and an atomic rename, so a crash
//! at any moment leaves either nothing or a complete, verified file. All calls here block (use `spawn_blocking`)
//! except [`BlobStore::memo_manifest`].

use crate::oci::{Algorithm, Digest};
use bytes::Bytes;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes of verified manifests kept in memory. Manifests are a few KiB, so this holds thousands; a
/// by-digest GET or HEAD of one of them then needs neither the blocking pool nor a disk read.
const MANIFEST_MEMO_BYTES: u64 = 16 * 1024 * 1024;

/// Handle to the on-disk tree. Cheap to clone.
#[derive(Clone)]
pub struct BlobStore {
    root: Arc<PathBuf>,
    manifests: Arc<ManifestMemo>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").field("root", &self.root).finish_non_exhaustive()
    }
}

/// Cached manifest files in memory, kept coherent with the files by this module alone.
struct ManifestMemo {
    entries: quick_cache::sync::Cache<Digest, (Arc<str>, Bytes), ManifestWeight>,
    /// Held while a file is read into the memo and while one is removed, so a removal cannot be undone
    /// by a read that started before it.
    files: Mutex<()>,
}

#[derive(Clone)]
struct ManifestWeight;

impl quick_cache::Weighter<Digest, (Arc<str>, Bytes)> for ManifestWeight {
    fn weight(&self, _: &Digest, (media_type, bytes): &(Arc<str>, Bytes)) -> u64 {
        // Plus the key and the entry's bookkeeping, roughly.
        (media_type.len() + bytes.len() + 128) as u64
    }
}

/// A file being written in `tmp/`; removed on drop unless [`BlobStore::commit`] consumed it.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    /// Shared so that readers can `pread` while the fill appends.
    pub file: Arc<File>,
    armed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl BlobStore {
    /// Opens (creating) the tree under `root` and removes temporary files left by a crash.
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in ["blobs", "manifests", "tmp"] {
            fs::create_dir_all(root.join(dir))?;
        }
        for entry in fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let _ = fs::remove_file(entry.path());
        }
        let manifests = ManifestMemo {
            entries: quick_cache::sync::Cache::with_weighter(4096, MANIFEST_MEMO_BYTES, ManifestWeight),
            files: Mutex::new(()),
        };
        Ok(BlobStore { root: Arc::new(root.to_path_buf()), manifests: Arc::new(manifests) })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, kind: &str, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(kind).join(digest.algorithm().as_str()).join(&hex[..2]).join(hex)
    }

    /// Opens a committed blob: the file and its size, or `None` on a miss.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.path("blobs", digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Size of a committed blob, without opening it.
    pub fn blob_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.path("blobs", digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a new temporary file.
    pub fn temp(&self) -> io::Result<TempFile> {
        let name: u64 = rand::random();
        let path = self.root.join("tmp").join(format!("{name:016x}"));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        Ok(TempFile { path, file: Arc::new(file), armed: true })
    }

    /// Makes a verified temporary file the blob for `digest`: fsync, rename, fsync the directory.
    pub fn commit_blob(&self, mut temp: TempFile, digest: &Digest) -> io::Result<()> {
        temp.file.sync_all()?;
        let dest = self.path("blobs", digest);
        self.rename_into(&temp.path, &dest)?;
        temp.armed = false;
        Ok(())
    }

    fn rename_into(&self, from: &Path, dest: &Path) -> io::Result<()> {
        let dir = dest.parent().expect("store paths have parents");
        fs::create_dir_all(dir)?;
        fs::rename(from, dest)?;
        File::open(dir)?.sync_all()
    }

    /// Removes a committed blob (eviction, or a file found corrupt).
    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path("blobs", digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A cached manifest if it is in memory: never touches the disk, so it may run on the async runtime.
    pub fn memo_manifest(&self, digest: &Digest) -> Option<(String, Bytes)> {
        self.manifests.entries.get(digest).map(|(media_type, bytes)| (media_type.to_string(), bytes))
    }

    /// Reads a cached manifest: its media type and exact bytes (from memory when there).
    pub fn read_manifest(&self, digest: &Digest) -> io::Result<Option<(String, Bytes)>> {
        if let Some(found) = self.memo_manifest(digest) {
            return Ok(Some(found));
        }
        let _files = self.manifests.files.lock().unwrap_or_else(|e| e.into_inner());
        let data = match fs::read(self.path("manifests", digest)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Layout: "<media type>\n<bytes>". Written atomically, so a malformed file means tampering: treat as a miss.
        let Some(nl) = data.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let media_type: Arc<str> = String::from_utf8_lossy(&data[..nl]).into();
        let bytes = Bytes::copy_from_slice(&data[nl + 1..]);
        if !digest.matches(&bytes) {
            return Ok(None);
        }
        self.manifests.entries.insert(digest.clone(), (media_type.clone(), bytes.clone()));
        Ok(Some((media_type.to_string(), bytes)))
    }

    /// Stores a manifest whose bytes the caller verified against `digest`.
    pub fn write_manifest(&self, digest: &Digest, media_type: &str, bytes: &Bytes) -> io::Result<()> {
        let mut temp = self.temp()?;
        {
            let mut f: &File = &temp.file;
            f.write_all(media_type.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        let _files = self.manifests.files.lock().unwrap_or_else(|e| e.into_inner());
        self.rename_into(&temp.path, &self.path("manifests", digest))?;
        temp.armed = false;
        self.manifests.entries.insert(digest.clone(), (media_type.into(), bytes.clone()));
        Ok(())
    }

    /// Removes a cached manifest.
    pub fn remove_manifest(&self, digest: &Digest) -> io::Result<()> {
        let _files = self.manifests.files.lock().unwrap_or_else(|e| e.into_inner());
        self.manifests.entries.remove(digest);
        match fs::remove_file(self.path("manifests", digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// True when a blob is committed.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.path("blobs", digest).is_file()
    }

    /// True when a manifest is cached.
    pub fn has_manifest(&self, digest: &Digest) -> bool {
        self.path("manifests", digest).is_file()
    }

    /// Every cached manifest's digest.
    pub fn scan_manifests(&self) -> io::Result<Vec<Digest>> {
        self.scan("manifests").map(|v| v.into_iter().map(|(d, _)| d).collect())
    }

    /// Lists every committed blob with its size (for rebuilding metadata).
    pub fn scan_blobs(&self) -> io::Result<Vec<(Digest, u64)>> {
        self.scan("blobs")
    }

    /// Capacity of the filesystem holding the store and the bytes in use on it, as `df` reports them
    /// (capacity = used + available to unprivileged users), from `statvfs`.
    pub fn filesystem(&self) -> io::Result<(u64, u64)> {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid C string and `st` a properly sized out-parameter.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        // Thin-provisioned and overlay filesystems report f_blocks far above what can be used; `df`'s Use%
        // (used / (used + available)) is what an operator compares against the watermarks.
        let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize;
        let available = st.f_bavail as u64 * frsize;
        Ok((used + available, used))
    }

    /// Bytes still available to wharf on the store's filesystem (`statvfs`), and the reserve that fills must
    /// leave of it: `min_free`, but at most a tenth of the filesystem.
    pub fn free_and_reserve(&self, min_free: u64) -> io::Result<(u64, u64)> {
        let (capacity, used) = self.filesystem()?;
        Ok((capacity.saturating_sub(used), reserve(capacity, min_free)))
    }

    fn scan(&self, kind: &str) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for algo in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join(kind).join(algo.as_str());
            let Ok(prefixes) = fs::read_dir(&dir) else { continue };
            for prefix in prefixes {
                for entry in fs::read_dir(prefix?.path())? {
                    let entry = entry?;
                    let name = entry.file_name();
                    let parsed = name.to_str().and_then(|n| format!("{}:{n}", algo.as_str()).parse::<Digest>().ok());
                    if let Some(d) = parsed {
                        out.push((d, entry.metadata()?.len()));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The free space fills leave on a filesystem of `capacity` bytes: `min_free`, but at most a tenth of it (a
/// small filesystem still takes blobs).
pub fn reserve(capacity: u64, min_free: u64) -> u64 {
    min_free.min(capacity / 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn temp_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let t = store.temp().unwrap();
        (&*t.file).write_all(b"hello").unwrap();
        drop(t);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let d = Digest::sha256_of(b"hello");
        let t = store.temp().unwrap();
        (&*t.file).write_all(b"hello").unwrap();
        store.commit_blob(t, &d).unwrap();
        let (_, len) = store.open_blob(&d).unwrap().unwrap();
        assert_eq!(len, 5);
        assert_eq!(store.scan_blobs().unwrap(), vec![(d, 5)]);
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let t = store.temp().unwrap();
        std::mem::forget(t);
        BlobStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn manifests_round_trip_and_tampering_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let d = Digest::sha256_of(&body);
        store.write_manifest(&d, "application/vnd.oci.image.manifest.v1+json", &body).unwrap();
        let (mt, bytes) = store.read_manifest(&d).unwrap().unwrap();
        assert_eq!((mt.as_str(), &bytes), ("application/vnd.oci.image.manifest.v1+json", &body));
        fs::write(store.path("manifests", &d), b"x\n{}").unwrap();
        // A fresh handle (as after a restart) has only the file to go by.
        let reopened = BlobStore::open(dir.path()).unwrap();
        assert!(reopened.read_manifest(&d).unwrap().is_none());
    }

    #[test]
    fn manifest_memo_follows_writes_reads_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let body = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
        let d = Digest::sha256_of(&body);
        assert!(store.memo_manifest(&d).is_none());
        store.write_manifest(&d, "application/vnd.oci.image.manifest.v1+json", &body).unwrap();
        assert_eq!(store.memo_manifest(&d).map(|(_, b)| b), Some(body.clone()));

        // Read from disk by a fresh handle, then answered from memory even with the file gone.
        let other = BlobStore::open(dir.path()).unwrap();
        assert!(other.memo_manifest(&d).is_none());
        assert!(other.read_manifest(&d).unwrap().is_some());
        fs::remove_file(other.path("manifests", &d)).unwrap();
        assert_eq!(other.read_manifest(&d).unwrap().map(|(_, b)| b), Some(body.clone()));

        // Removal forgets it in memory too.
        store.write_manifest(&d, "application/vnd.oci.image.manifest.v1+json", &body).unwrap();
        store.remove_manifest(&d).unwrap();
        assert!(store.memo_manifest(&d).is_none());
        assert!(store.read_manifest(&d).unwrap().is_none());
    }
}
