//! Where a fill's bytes come from: the peers that own the blob, in order, then the upstream registry. Who
//! asked (the registry, the repository) is kept apart from where the bytes come from, so the one fill
//! pipeline (claim, download, write at offset, hash, verify, commit) serves every origin.

use crate::cluster::{Cluster, PeerError};
use crate::oci::{Digest, RepoName};
use crate::upstream::{self, RegistryClient};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The sources of one fill, tried in order: `peers` (empty without a cluster, when this node owns the blob,
/// or when a peer asked), then the registry.
#[derive(Clone)]
pub struct Origins {
    /// The registry the blob comes from, and whose name and credentials a peer uses to fetch it.
    pub registry: Arc<RegistryClient>,
    /// The repository as the registry names it.
    pub repo: RepoName,
    /// Peers to ask first, best first.
    pub peers: Vec<String>,
    /// The cluster, when `peers` is not empty.
    pub cluster: Option<Cluster>,
}

/// A peer's answer: the blob's total size and its bytes from the offset asked for.
pub(super) struct PeerBytes {
    pub total: u64,
    pub body: BoxStream<'static, Result<Bytes, upstream::Error>>,
    /// Set when the body ended because the peer stalled (not because it broke).
    pub stalled: Arc<AtomicBool>,
}

impl Origins {
    /// Blob bytes from `peer`, from byte `from` on. A stall (no byte for the stall timeout) ends the body
    /// with an error, unless the peer says its own fill is waiting for the upstream: then it was worth
    /// waiting and the wait goes on.
    pub(super) async fn open_peer(&self, peer: &str, digest: &Digest, from: u64) -> Result<PeerBytes, PeerError> {
        let cluster = self.cluster.as_ref().expect("peer origins come with a cluster");
        let blob = cluster.client().get_blob(peer, &self.registry.name, &self.repo, digest, from).await?;
        let (total, skip) = match (blob.partial, blob.size) {
            (Some((_, _, total)), _) => (total, 0),
            // A peer that ignored the range sent the whole blob: drop what is already here.
            (None, Some(size)) => (size, from),
            (None, None) => return Err(PeerError::Protocol("no Content-Length".into())),
        };
        let stalled = Arc::new(AtomicBool::new(false));
        let body = skip_bytes(blob.body, skip);
        let body = watch_stalls(body, cluster.clone(), peer.to_owned(), digest.clone(), stalled.clone());
        Ok(PeerBytes { total, body, stalled })
    }
}

/// Drops the first `skip` bytes of `body`.
pub(super) fn skip_bytes(
    body: BoxStream<'static, Result<Bytes, upstream::Error>>,
    mut skip: u64,
) -> BoxStream<'static, Result<Bytes, upstream::Error>> {
    if skip == 0 {
        return body;
    }
    body.filter_map(move |item| {
        let out = match item {
            Ok(b) if skip >= b.len() as u64 => {
                skip -= b.len() as u64;
                None
            }
            Ok(b) => Some(Ok(b.slice(std::mem::take(&mut skip) as usize..))),
            Err(e) => Some(Err(e)),
        };
        futures_util::future::ready(out)
    })
    .boxed()
}

/// Ends `body` with an error when it stalls and `peer`'s own fill is not what is slow.
fn watch_stalls(
    body: BoxStream<'static, Result<Bytes, upstream::Error>>,
    cluster: Cluster,
    peer: String,
    digest: Digest,
    stalled: Arc<AtomicBool>,
) -> BoxStream<'static, Result<Bytes, upstream::Error>> {
    let limit = cluster.stall_timeout();
    futures_util::stream::unfold(Some(body), move |body| {
        let (cluster, peer, digest, stalled) = (cluster.clone(), peer.clone(), digest.clone(), stalled.clone());
        async move {
            let mut body = body?;
            loop {
                match tokio::time::timeout(limit, body.next()).await {
                    Ok(Some(item)) => return Some((item, Some(body))),
                    Ok(None) => return None,
                    Err(_) => {
                        // A stopped or partitioned peer does not answer this either: its own bound.
                        let probe = limit.min(Duration::from_secs(2));
                        match cluster.client().fill_status(&peer, &digest, probe).await {
                            Ok(s) if s.state == "filling" && s.stalled_ms >= limit.as_millis() as u64 / 2 => {
                                tracing::info!(%peer, %digest, "peer is waiting for its upstream; still waiting for it");
                                continue;
                            }
                            _ => {
                                stalled.store(true, Ordering::Relaxed);
                                let e = upstream::Error::Protocol(format!("no bytes from peer {peer} for {limit:?}"));
                                return Some((Err(e), None));
                            }
                        }
                    }
                }
            }
        }
    })
    .boxed()
}
