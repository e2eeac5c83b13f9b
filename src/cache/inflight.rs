//! The claim map: at most one fill per digest. Lookups run on the blocking pool because deciding
//! "hit, join or fill" needs the file system and the map under one lock, or a fill could start twice.
//!
//! The right to fill is a [`Claim`], an owning guard: whoever drops it without finishing the fill (a request
//! cancelled while its lookup ran on the blocking pool, a fill task that panicked) releases the digest and
//! fails the fill for everyone who joined it, so no entry is left waiting for an owner that is gone.

use super::Error;
use super::fill::{Fill, FillState};
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
    /// This caller must run the fill; dropping the claim releases it.
    Owner(Claim),
}

/// The right, and the duty, to run one fill. Dropped, it removes its entry from the map and, unless the fill
/// reached an end state, fails it with [`Error::Abandoned`] so that joined readers answer instead of waiting.
#[derive(Debug)]
pub struct Claim {
    /// The fill every joiner watches.
    pub fill: Arc<Fill>,
    /// Where the bytes go; taken by the fill when it commits or gives up caching.
    pub temp: Option<TempFile>,
    inflight: Arc<Inflight>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Freed first, so that a reader woken by the failure and asking again starts a new fill.
        self.inflight.remove(&self.fill);
        let unfinished = matches!(*self.fill.subscribe().borrow(), FillState::Starting | FillState::Streaming { .. });
        if unfinished {
            tracing::warn!(digest = %self.fill.digest, "a fill was abandoned before it ended; its readers are failed");
            self.fill.fail(Error::Abandoned);
        }
        // The temporary file (if still held) is removed by its own guard.
    }
}

/// Digest → running fill. Entries are removed when a fill's [`Claim`] is dropped, whatever the outcome.
#[derive(Debug, Default)]
pub struct Inflight {
    // std Mutex: held for short blocking sections only, never across an await.
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
}

impl Inflight {
    /// Hit, join or claim `digest`. Blocking.
    pub fn lookup_or_claim(self: &Arc<Self>, store: &BlobStore, digest: &Digest) -> io::Result<Lookup> {
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
        Ok(Lookup::Owner(Claim { fill, temp: Some(temp), inflight: self.clone() }))
    }

    /// The running fill for `digest`, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.fills.lock().unwrap().get(digest).cloned()
    }

    /// Removes `fill`'s entry (not a newer fill's for the same digest); readers holding the `Arc` keep their
    /// file.
    fn remove(&self, fill: &Arc<Fill>) {
        let mut fills = self.fills.lock().unwrap();
        if fills.get(&fill.digest).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(&fill.digest);
        }
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
                        // Keep the claim until every thread has looked up.
                        Lookup::Owner(claim) => Some(claim),
                        _ => None,
                    })
                })
                .collect();
            let claims: Vec<Claim> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
            claims.len()
        });
        assert_eq!(owners, 1);
        // The claim was dropped with the fill never run: the digest is free again.
        assert_eq!(inflight.len(), 0);
        assert!(matches!(inflight.lookup_or_claim(&store, &d).unwrap(), Lookup::Owner(..)));
    }

    #[tokio::test]
    async fn a_dropped_claim_fails_its_joiners_and_frees_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let inflight = Arc::new(Inflight::default());
        let d = Digest::sha256_of(b"blob");
        let Lookup::Owner(claim) = inflight.lookup_or_claim(&store, &d).unwrap() else { panic!("not the owner") };
        let Lookup::Joined(joined) = inflight.lookup_or_claim(&store, &d).unwrap() else { panic!("not joined") };
        let temps = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(temps(), 1);
        drop(claim);
        let err = joined.wait_started().await.expect_err("the joiner must be failed, not left waiting");
        assert!(matches!(*err, Error::Abandoned), "unexpected error: {err}");
        assert_eq!(temps(), 0, "the temporary file was left behind");
        assert_eq!(inflight.len(), 0);
        assert!(matches!(inflight.lookup_or_claim(&store, &d).unwrap(), Lookup::Owner(..)));
    }

    #[test]
    fn a_finished_fill_is_not_failed_when_its_claim_drops() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let inflight = Arc::new(Inflight::default());
        let d = Digest::sha256_of(b"blob");
        let Lookup::Owner(claim) = inflight.lookup_or_claim(&store, &d).unwrap() else { panic!("not the owner") };
        let fill = claim.fill.clone();
        fill.done(4);
        drop(claim);
        assert!(matches!(*fill.subscribe().borrow(), FillState::Done { size: 4 }));
        assert_eq!(inflight.len(), 0);
    }
}
