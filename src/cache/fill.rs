//! One upstream download into a temporary file, hashed as it lands, with progress published to every reader.
//! A fill belongs to the cache, not to the request that started it: it runs to the end even if that client leaves.

use super::Error;
use super::store::TempFile;
use crate::oci::{Digest, Verifier};
use crate::upstream::BlobStream;
use bytes::Bytes;
use futures_util::StreamExt;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Where a fill is. Readers watch this to know how far they may read.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for the upstream's answer.
    Starting,
    /// Bytes `0..written` are in the file; `total` is the announced size.
    Streaming {
        /// Bytes written so far.
        written: u64,
        /// `Content-Length` from upstream.
        total: Option<u64>,
    },
    /// Verified and committed; `size` bytes.
    Done {
        /// Final size.
        size: u64,
    },
    /// Failed: the file is gone or will be, and readers must fail too.
    Failed(Arc<Error>),
}

/// A running fill, shared by every request for its digest.
#[derive(Debug)]
pub struct Fill {
    /// The blob being filled.
    pub digest: Digest,
    /// The temporary file; an open descriptor stays valid across the rename at commit.
    pub file: Arc<File>,
    state: watch::Sender<FillState>,
}

impl Fill {
    /// A fill in the `Starting` state.
    pub fn new(digest: Digest, file: Arc<File>) -> Self {
        Fill {
            digest,
            file,
            state: watch::Sender::new(FillState::Starting),
        }
    }

    /// A receiver of state changes.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// Waits until the size is known (or the fill failed): what a response needs before its headers.
    pub async fn wait_started(&self) -> Result<Option<u64>, Arc<Error>> {
        let mut rx = self.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, FillState::Starting))
            .await
            .map(|s| s.clone());
        match state {
            Ok(FillState::Streaming { total, .. }) => Ok(total),
            Ok(FillState::Done { size }) => Ok(Some(size)),
            Ok(FillState::Failed(e)) => Err(e),
            Ok(FillState::Starting) | Err(_) => unreachable!("wait_for returned a Starting state"),
        }
    }

    /// Waits for the end: the committed size, or the error.
    pub async fn wait_done(&self) -> Result<u64, Arc<Error>> {
        let mut rx = self.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, FillState::Done { .. } | FillState::Failed(_)))
            .await
            .map(|s| s.clone());
        match state {
            Ok(FillState::Done { size }) => Ok(size),
            Ok(FillState::Failed(e)) => Err(e),
            _ => unreachable!("wait_for returned an unfinished state"),
        }
    }

    /// Publishes a failure to every reader.
    pub fn fail(&self, error: Error) {
        self.state.send_replace(FillState::Failed(Arc::new(error)));
    }

    #[cfg(test)]
    pub(crate) fn state_for_test(&self, state: FillState) {
        self.state.send_replace(state);
    }

    /// Publishes the committed size.
    pub fn done(&self, size: u64) {
        self.state.send_replace(FillState::Done { size });
    }

    /// Streams the upstream body into `temp` while hashing, then checks size and digest.
    /// The file is written and hashed on the blocking pool; this task only moves `Bytes`.
    pub async fn download(self: &Arc<Self>, temp: &TempFile, blob: BlobStream) -> Result<u64, Error> {
        let total = blob.size;
        self.state.send_replace(FillState::Streaming { written: 0, total });
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        let file = temp.file.clone();
        let me = self.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<(Digest, u64), Error> {
            let mut verifier = Verifier::new(me.digest.algorithm());
            let mut written = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                (&*file).write_all(&chunk)?;
                verifier.update(&chunk);
                written += chunk.len() as u64;
                me.state.send_modify(|s| {
                    if let FillState::Streaming { written: w, .. } = s {
                        *w = written;
                    }
                });
            }
            Ok((verifier.finish(), written))
        });
        let mut body = blob.body;
        let mut received = 0u64;
        let mut upstream_error = None;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    if total.is_some_and(|t| received > t) || tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    upstream_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let (actual, written) = writer.await??;
        if let Some(e) = upstream_error {
            return Err(e.into());
        }
        if let Some(announced) = total.filter(|t| *t != received) {
            return Err(Error::SizeMismatch { announced, received });
        }
        if actual != self.digest {
            return Err(Error::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        Ok(written)
    }
}
