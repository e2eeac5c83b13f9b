//! Metadata in sled: tags (with when they were checked), blob sizes, and which repositories reference which blobs.
//! Only a cache of what the files say: a missing or corrupt database is rebuilt from the blob tree. The only `use sled`.

use crate::oci::Digest;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Handle to the metadata database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Meta {
    db: sled::Db,
    tags: sled::Tree,
    blobs: sled::Tree,
    refs: sled::Tree,
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
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Meta {
    /// Opens the database at `path`. A corrupt database is moved aside and a new one created.
    /// Returns whether the database is new (and so must be rebuilt from the blob tree).
    pub fn open(path: &Path) -> io::Result<(Meta, bool)> {
        let existed = path.join("db").exists();
        let db = match sled::open(path) {
            Ok(db) => db,
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
            db,
        };
        let fresh = !existed || meta.db.get("initialized").map_err(io::Error::other)?.is_none();
        Ok((meta, fresh))
    }

    /// Marks a rebuild complete, so the next start-up trusts the database.
    pub fn mark_initialized(&self) -> Result<(), sled::Error> {
        self.db.insert("initialized", &b"1"[..])?;
        Ok(())
    }

    /// The entry for a tag key (see `cache::manifests` for the key format).
    pub fn tag(&self, key: &str) -> Result<Option<TagEntry>, sled::Error> {
        Ok(self.tags.get(key)?.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Stores a tag entry.
    pub fn put_tag(&self, key: &str, entry: &TagEntry) -> Result<(), sled::Error> {
        self.tags
            .insert(key, serde_json::to_vec(entry).expect("tag entries serialize"))?;
        Ok(())
    }

    /// Forgets a tag the upstream no longer has.
    pub fn remove_tag(&self, key: &str) -> Result<(), sled::Error> {
        self.tags.remove(key)?;
        Ok(())
    }

    /// Records a committed blob and, when known, a repository that references it.
    pub fn record_blob(&self, digest: &Digest, size: u64, repo: Option<&str>) -> Result<(), sled::Error> {
        let entry = BlobEntry {
            size,
            stored_at: now_secs(),
        };
        self.blobs.insert(
            digest.to_string(),
            serde_json::to_vec(&entry).expect("blob entries serialize"),
        )?;
        if let Some(repo) = repo {
            self.refs.insert(format!("{repo}\0{digest}"), &[][..])?;
        }
        Ok(())
    }

    /// The recorded entry for a blob.
    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobEntry>, sled::Error> {
        Ok(self
            .blobs
            .get(digest.to_string())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Number of blobs recorded.
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
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
    fn initialized_database_is_not_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let (meta, fresh) = Meta::open(&path).unwrap();
            assert!(fresh);
            meta.mark_initialized().unwrap();
            meta.db.flush().unwrap();
        }
        let (_, fresh) = Meta::open(&path).unwrap();
        assert!(!fresh);
    }
}
