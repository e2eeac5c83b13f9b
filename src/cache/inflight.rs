//! The claim map: at most one fill per digest. Lookups run on the blocking pool because deciding
//! "hit, join or fill" needs the file system and the map under one lock, or a fill could start twice.

use super::fill::Fill;
use super::store::{BlobStore, TempFile};
use crate::oci::Digest;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

/// Outcome of a lookup.
pub enum Lookup {
    /// The blob is committed.
    Hit(File, u64),
    /// Another request is filling it; stream from its growing file.
    Joined(Arc<Fill>),
    /// This caller must start the fill, writing into the temporary file.
    Owner(Arc<Fill>, TempFile),
}

/// Digest → running fill. Entries are removed when a fill ends, successful or not.
#[derive(Debug, Default)]
pub struct Inflight {
    // std Mutex: held for short blocking sections only, never across an await.
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl Inflight {
    /// Hit, join or claim `digest`. Blocking.
    pub fn lookup_or_claim(&self, store: &BlobStore, digest: &Digest) -> io::Result<Lookup> {
        if let Some((f, len)) = store.open_blob(digest)? {
            return Ok(Lookup::Hit(f, len));
        }
        let mut fills = self.fills.lock().unwrap();
        if let Some(fill) = fills.get(digest) {
            return Ok(Lookup::Joined(fill.clone()));
        }
        // A fill may have committed and left the map between the first check and the lock.
        if let Some((f, len)) = store.open_blob(digest)? {
            return Ok(Lookup::Hit(f, len));
        }
        let temp = store.temp()?;
        let fill = Arc::new(Fill::new(digest.clone(), temp.file.clone()));
        fills.insert(digest.clone(), fill.clone());
        Ok(Lookup::Owner(fill, temp))
    }

    /// The running fill for `digest`, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills.lock().unwrap().get(digest).cloned()
    }

    /// Removes the entry once its fill has ended; readers holding the `Arc` keep their file.
    pub fn remove(&self, digest: &Digest) {
        self.fills.lock().unwrap().remove(digest);
    }

    /// Number of fills running.
    pub fn len(&self) -> usize {
        self.fills.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_claims_make_one_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let inflight = Arc::new(Inflight::default());
        let d = Digest::sha256_of(b"blob");
        let owners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (store, inflight, d) = (store.clone(), inflight.clone(), d.clone());
                    s.spawn(move || match inflight.lookup_or_claim(&store, &d).unwrap() {
                        // Keep the temp file alive until the end of the test thread.
                        Lookup::Owner(_, temp) => {
                            std::mem::forget(temp);
                            1
                        }
                        _ => 0,
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(owners, 1);
        inflight.remove(&d);
        assert!(matches!(inflight.lookup_or_claim(&store, &d).unwrap(), Lookup::Owner(..)));
    }
}
