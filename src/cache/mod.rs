//! The cache: decides hit, join or fill for blobs, and owns manifests, tags and metadata.
//! It never builds an HTTP response; `api` turns its handles into responses.
//!
//! A blob request: [`Cache::blob`] → committed file (hit) | running fill (coalesced) | new fill (miss, spawned
//! on the cache's task tracker so it outlives the client) → [`reader::body`] streams the bytes.

mod error;
mod fill;
mod inflight;
mod manifests;
pub mod meta;
pub mod reader;
mod store;

pub use error::Error;
pub use fill::{Fill, FillPlan, FillState};
pub use manifests::{ManifestAnswer, ManifestInfo};
pub use store::BlobStore;

use crate::oci::{Digest, RepoName};
use crate::upstream::RegistryClient;
use inflight::{Inflight, Lookup};
use meta::Meta;
use std::path::Path;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// How a request was answered, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From disk or memory, no upstream request.
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// Joined a fill another request started.
    Coalesced,
    /// A tag revalidated upstream with a HEAD, content from cache.
    Revalidated,
    /// Upstream failed; last known content served.
    Stale,
    /// Forwarded to the upstream without caching.
    Passthrough,
}

impl Outcome {
    /// Lowercase name for log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Passthrough => "passthrough",
        }
    }
}

/// A blob ready to stream.
pub enum BlobHandle {
    /// Committed and verified.
    Committed {
        /// Open file.
        file: Arc<std::fs::File>,
        /// Size.
        size: u64,
    },
    /// Still being filled; `size` is the upstream's announced length.
    Filling {
        /// The fill to follow.
        fill: Arc<Fill>,
        /// Announced size, if any.
        size: Option<u64>,
    },
}

/// Cheap-clone handle to the cache.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

struct Shared {
    store: BlobStore,
    meta: Meta,
    inflight: Inflight,
    /// Fills run here, not on the request's task, and shutdown waits for them.
    tasks: TaskTracker,
    tag_ttl: u64,
    plan: FillPlan,
}

impl Cache {
    /// Opens the data directory: removes leftover temporary files, opens (or rebuilds) the metadata.
    /// Blocking; call before serving.
    pub fn open(data_dir: &Path, tag_ttl: u64, plan: FillPlan, tasks: TaskTracker) -> Result<Cache, Error> {
        let store = BlobStore::open(data_dir)?;
        let (meta, fresh) = Meta::open(&data_dir.join("meta"))?;
        if fresh {
            let blobs = store.scan_blobs()?;
            for (digest, size) in &blobs {
                meta.record_blob(digest, *size, None)?;
            }
            meta.mark_initialized()?;
            tracing::info!(blobs = blobs.len(), "metadata rebuilt from the blob tree");
        }
        let shared = Shared {
            store,
            meta,
            inflight: Inflight::default(),
            tasks,
            tag_ttl,
            plan,
        };
        Ok(Cache {
            shared: Arc::new(shared),
        })
    }

    /// The on-disk store (readiness checks write through it).
    pub fn store(&self) -> &BlobStore {
        &self.shared.store
    }

    /// Number of fills running now.
    pub fn fills_in_flight(&self) -> usize {
        self.shared.inflight.len()
    }

    /// Finds or starts the blob. On a miss the fill is spawned and this waits only for the upstream's
    /// answer (so a 404 is still a clean 404), not for the bytes.
    pub async fn blob(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(BlobHandle, Outcome), Error> {
        let shared = self.shared.clone();
        let d = digest.clone();
        let lookup = tokio::task::spawn_blocking(move || shared.inflight.lookup_or_claim(&shared.store, &d)).await??;
        let (fill, outcome) = match lookup {
            Lookup::Hit(file, size) => {
                return Ok((
                    BlobHandle::Committed {
                        file: Arc::new(file),
                        size,
                    },
                    Outcome::Hit,
                ));
            }
            Lookup::Joined(fill) => (fill, Outcome::Coalesced),
            Lookup::Owner(fill, temp) => {
                let this = self.clone();
                let (client, repo, f) = (client.clone(), repo.clone(), fill.clone());
                self.shared
                    .tasks
                    .spawn(async move { this.run_fill(f, temp, &client, &repo).await });
                (fill, Outcome::Miss)
            }
        };
        let size = fill.wait_started().await.map_err(unshare)?;
        Ok((BlobHandle::Filling { fill, size }, outcome))
    }

    async fn run_fill(&self, fill: Arc<Fill>, temp: store::TempFile, client: &RegistryClient, repo: &RepoName) {
        let digest = fill.digest.clone();
        let result = async {
            let size = fill.download(&temp, client, repo, self.shared.plan).await?;
            let store = self.shared.store.clone();
            let d = digest.clone();
            tokio::task::spawn_blocking(move || store.commit_blob(temp, &d)).await??;
            self.shared
                .meta
                .record_blob(&digest, size, Some(&format!("{}/{}", client.name, repo)))?;
            Ok::<u64, Error>(size)
        }
        .await;
        match result {
            Ok(size) => {
                tracing::info!(%digest, size, registry = %client.name, %repo, "blob committed");
                fill.done(size);
            }
            Err(e) => {
                if matches!(e, Error::DigestMismatch { .. } | Error::SizeMismatch { .. }) {
                    tracing::error!(%digest, registry = %client.name, %repo, error = %e, "upstream sent bad bytes; discarded");
                } else {
                    tracing::warn!(%digest, registry = %client.name, %repo, error = %e, "blob fill failed");
                }
                fill.fail(e);
            }
        }
        self.shared.inflight.remove(&digest);
    }

    /// Size of a blob for a HEAD: from disk, from a running fill, or from an upstream HEAD. Never starts a fill.
    pub async fn blob_info(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, Outcome), Error> {
        let store = self.shared.store.clone();
        let d = digest.clone();
        if let Some(size) = tokio::task::spawn_blocking(move || store.blob_size(&d)).await?? {
            return Ok((size, Outcome::Hit));
        }
        if let Some(fill) = self.shared.inflight.get(digest)
            && let Ok(Some(size)) = fill.wait_started().await
        {
            return Ok((size, Outcome::Coalesced));
        }
        match client.head_blob(repo, digest).await? {
            Some(size) => Ok((size, Outcome::Passthrough)),
            None => Err(crate::upstream::Error::Protocol("blob HEAD without Content-Length".into()).into()),
        }
    }
}

/// A fill's error is shared by all its readers; each request gets its own copy of what matters.
fn unshare(e: Arc<Error>) -> Error {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => match &*shared {
            Error::Upstream(u) => Error::Upstream(match u {
                crate::upstream::Error::NotFound => crate::upstream::Error::NotFound,
                crate::upstream::Error::Unauthorized => crate::upstream::Error::Unauthorized,
                crate::upstream::Error::Denied => crate::upstream::Error::Denied,
                crate::upstream::Error::RateLimited => crate::upstream::Error::RateLimited,
                crate::upstream::Error::Status(s) => crate::upstream::Error::Status(*s),
                other => crate::upstream::Error::Protocol(other.to_string()),
            }),
            other => Error::Io(std::io::Error::other(other.to_string())),
        },
    }
}
