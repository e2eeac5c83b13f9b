//! What the cache can report to the API layer.

use crate::oci::Digest;
use std::sync::Arc;

/// A cache failure; `api` maps each variant to an OCI error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream could not supply the content.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::Error),
    /// The upstream's bytes did not hash to the requested digest; nothing was stored.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What the client asked for.
        expected: Digest,
        /// What the bytes hashed to.
        actual: Digest,
    },
    /// The upstream sent a different number of bytes than it announced.
    #[error("size mismatch: announced {announced}, received {received}")]
    SizeMismatch {
        /// `Content-Length`.
        announced: u64,
        /// Bytes received.
        received: u64,
    },
    /// Local disk failure.
    #[error("storage I/O")]
    Io(#[from] std::io::Error),
    /// Metadata database failure.
    #[error("metadata database")]
    Meta(#[from] sled::Error),
    /// The fill's owner went away before it ended (its request was cancelled during the claim, or the fill
    /// task panicked), or a shared manifest fetch panicked; the next request starts anew.
    #[error("the upstream fetch was abandoned before it ended; a retry starts anew")]
    Abandoned,
    /// A peer asked for a blob this node is itself fetching from a peer. Serving it would have the two wait
    /// on each other (their views of the cluster disagree), so the peer is told to use its next source.
    #[error("this node is fetching the blob from a peer itself")]
    ViaPeer,
    /// A blocking task panicked or was cancelled.
    #[error("background task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    /// The error of a fill or a shared upstream request, for one of the callers waiting on it: the error
    /// itself when this caller is the last holder, else a copy of what matters for the answer (the same
    /// variant where it can be copied; a local I/O error carried as text).
    pub(crate) fn unshare(e: Arc<Error>) -> Error {
        let e = match Arc::try_unwrap(e) {
            Ok(e) => return e,
            Err(shared) => shared,
        };
        match &*e {
            Error::Upstream(u) => Error::Upstream(u.copy()),
            Error::DigestMismatch { expected, actual } => {
                Error::DigestMismatch { expected: expected.clone(), actual: actual.clone() }
            }
            Error::SizeMismatch { announced, received } => {
                Error::SizeMismatch { announced: *announced, received: *received }
            }
            Error::Abandoned => Error::Abandoned,
            Error::ViaPeer => Error::ViaPeer,
            other => Error::Io(std::io::Error::other(other.to_string())),
        }
    }
}
