//! The content-addressed file tree: `blobs/<algo>/<2 hex>/<hex>`, `manifests/<algo>/<2 hex>/<hex>`, `tmp/`.
//! The files are the truth. Everything lands through a temporary file, fsync and an atomic rename, so a crash
//! at any moment leaves either nothing or a complete, verified file. All calls here block: use `spawn_blocking`.

use crate::oci::{Algorithm, Digest};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Handle to the on-disk tree. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: Arc<PathBuf>,
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
        Ok(BlobStore { root: Arc::new(root.to_path_buf()) })
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

    /// Reads a cached manifest: its media type and exact bytes.
    pub fn read_manifest(&self, digest: &Digest) -> io::Result<Option<(String, Vec<u8>)>> {
        let data = match fs::read(self.path("manifests", digest)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Layout: "<media type>\n<bytes>". Written atomically, so a malformed file means tampering: treat as a miss.
        let Some(nl) = data.iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let media_type = String::from_utf8_lossy(&data[..nl]).into_owned();
        let bytes = data[nl + 1..].to_vec();
        if !digest.matches(&bytes) {
            return Ok(None);
        }
        Ok(Some((media_type, bytes)))
    }

    /// Stores a manifest whose bytes the caller verified against `digest`.
    pub fn write_manifest(&self, digest: &Digest, media_type: &str, bytes: &[u8]) -> io::Result<()> {
        let mut temp = self.temp()?;
        {
            let mut f: &File = &temp.file;
            f.write_all(media_type.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        self.rename_into(&temp.path, &self.path("manifests", digest))?;
        temp.armed = false;
        Ok(())
    }

    /// Removes a cached manifest.
    pub fn remove_manifest(&self, digest: &Digest) -> io::Result<()> {
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
        let body = br#"{"schemaVersion":2}"#;
        let d = Digest::sha256_of(body);
        store.write_manifest(&d, "application/vnd.oci.image.manifest.v1+json", body).unwrap();
        let (mt, bytes) = store.read_manifest(&d).unwrap().unwrap();
        assert_eq!((mt.as_str(), bytes.as_slice()), ("application/vnd.oci.image.manifest.v1+json", &body[..]));
        fs::write(store.path("manifests", &d), b"x\n{}").unwrap();
        assert!(store.read_manifest(&d).unwrap().is_none());
    }
}
