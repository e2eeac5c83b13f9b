//! Where a fill's bytes come from: the peers that own the blob, in order, then the shared bucket, then the
//! upstream registry. Who asked (the registry, the repository) is kept apart from where the bytes come
//! from, so the one fill pipeline (claim, download, write at offset, hash, verify, commit) serves every
//! origin.

use crate::bucket::Bucket;
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
/// or when a peer asked), then the bucket (when configured and not skipped), then the registry.
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
    /// The shared bucket, asked after the peers and before the registry.
    pub bucket: Option<Bucket>,
}

/// One source of a blob's bytes. Closed: a peer, the bucket, the registry.
#[derive(Debug, Clone, Copy)]
pub(super) enum Origin<'a> {
    /// Another wharf instance, by peer address.
    Peer(&'a str),
    /// The shared bucket.
    Bucket,
    /// The upstream registry itself: the last resort, whose errors are the answer.
    Registry,
}

/// An origin's answer: the blob's total size and its bytes from the offset asked for.
pub(super) struct Opened {
    pub total: u64,
    /// Where the body's bytes end (exclusive): `total`, or less when only a range was sent.
    pub end: u64,
    pub body: BoxStream<'static, Result<Bytes, upstream::Error>>,
    /// Set when the body ended because the source stalled (not because it broke).
    pub stalled: Arc<AtomicBool>,
}

/// Why an origin could not (or could no longer) supply the blob.
pub(super) enum OriginError {
    /// Try the next origin; `suspect`: skip this one for a while (it looks down or lied).
    Next { reason: &'static str, suspect: bool },
    /// The last origin failed: this is the answer.
    Fail(upstream::Error),
}

impl Origins {
    /// The origins in the order they are tried.
    pub(super) fn sequence(&self) -> impl Iterator<Item = Origin<'_>> {
        let bucket = self.bucket.as_ref().filter(|b| b.is_usable()).map(|_| Origin::Bucket);
        self.peers.iter().map(|p| Origin::Peer(p)).chain(bucket).chain(std::iter::once(Origin::Registry))
    }

    /// Blob bytes from byte `from` on (through `end`, inclusive, when given and the origin honours it: see
    /// [`Opened::end`]), and the blob's size (which the registry may not announce for a whole-blob answer:
    /// `None` then). A peer always sends everything from `from`. A peer's stall (no byte for the stall
    /// timeout) ends its body with an error, unless the peer says its own fill is waiting for the upstream:
    /// then the wait goes on.
    pub(super) async fn open(
        &self,
        origin: Origin<'_>,
        digest: &Digest,
        from: u64,
        end: Option<u64>,
        total: Option<u64>,
    ) -> Result<(Option<u64>, Opened), OriginError> {
        let stalled = Arc::new(AtomicBool::new(false));
        match origin {
            Origin::Peer(peer) => {
                let cluster = self.cluster.as_ref().expect("peer origins come with a cluster");
                let ask = cluster.client().get_blob(peer, &self.registry.name, &self.repo, digest, from);
                let blob = answered(cluster, peer, digest, ask)
                    .await
                    .ok_or(OriginError::Next { reason: "stalled", suspect: true })?
                    .map_err(|e| peer_error(peer, digest, &e))?;
                let (total, skip) = match (blob.partial, blob.size) {
                    (Some((_, _, total)), _) => (total, 0),
                    // A peer that ignored the range sent the whole blob: drop what is already here.
                    (None, Some(size)) => (size, from),
                    (None, None) => return Err(OriginError::Next { reason: "protocol", suspect: true }),
                };
                let body = skip_bytes(blob.body, skip);
                let body = watch_stalls(body, cluster.clone(), peer.to_owned(), digest.clone(), stalled.clone());
                Ok((Some(total), Opened { total, end: total, body, stalled }))
            }
            Origin::Bucket => {
                let bucket = self.bucket.as_ref().expect("the bucket origin comes with a bucket");
                match bucket.open(digest, from, end).await {
                    Ok(Some((total, body))) => {
                        let end = end.map_or(total, |e| (e + 1).min(total));
                        Ok((Some(total), Opened { total, end, body, stalled }))
                    }
                    Ok(None) => Err(OriginError::Next { reason: "bucket_miss", suspect: false }),
                    Err(_) => Err(OriginError::Next { reason: "bucket_error", suspect: false }),
                }
            }
            Origin::Registry => {
                let range = match (from, end, total) {
                    (from, Some(end), _) => Some((from, end)),
                    (0, None, _) => None,
                    (from, None, Some(total)) => Some((from, total - 1)),
                    (_, None, None) => {
                        return Err(OriginError::Fail(upstream::Error::Protocol("resume without a size".into())));
                    }
                };
                let blob = self.registry.get_blob(&self.repo, digest, range).await.map_err(OriginError::Fail)?;
                let announced = blob.partial.map(|(_, _, t)| t).or(blob.size.filter(|_| from == 0));
                // An upstream that ignores the range sends the whole blob: the first `from` bytes are dropped.
                let skip = if blob.partial.is_some() { 0 } else { from };
                let total = announced.or(total).unwrap_or(u64::MAX);
                let end = blob.partial.map_or(total, |(_, end, _)| end + 1);
                Ok((announced, Opened { total, end, body: skip_bytes(blob.body, skip), stalled }))
            }
        }
    }
}

/// Waits for a peer's answer (its response head): past the stall timeout, only as long as the peer says
/// its own fill of the blob is alive. `None`: given up (a stopped or partitioned peer would otherwise hold
/// the fill, and every request joined to it, forever).
async fn answered<T>(
    cluster: &Cluster,
    peer: &str,
    digest: &Digest,
    ask: impl std::future::Future<Output = T>,
) -> Option<T> {
    let limit = cluster.stall_timeout();
    let mut ask = std::pin::pin!(ask);
    loop {
        match tokio::time::timeout(limit, &mut ask).await {
            Ok(answer) => return Some(answer),
            // Any live fill will do here: an owner whose upstream gave no size answers only at the end.
            Err(_) if owner_is_waiting(cluster, peer, digest, limit, false).await => continue,
            Err(_) => {
                tracing::warn!(%peer, %digest, "peer did not answer within {limit:?}; next source");
                return None;
            }
        }
    }
}

/// Whether `peer` says its own fill of `digest` is alive and (when `stalled`) itself waiting for its
/// upstream: then waiting for the peer is no slower than going to the upstream ourselves. The question has
/// its own short bound.
async fn owner_is_waiting(cluster: &Cluster, peer: &str, digest: &Digest, limit: Duration, stalled: bool) -> bool {
    let probe = limit.min(Duration::from_secs(2));
    match cluster.client().fill_status(peer, digest, probe).await {
        Ok(s) if s.state == "filling" && (!stalled || s.stalled_ms >= limit.as_millis() as u64 / 2) => {
            tracing::info!(%peer, %digest, "peer is waiting for its upstream; still waiting for it");
            true
        }
        _ => false,
    }
}

fn peer_error(peer: &str, digest: &Digest, e: &PeerError) -> OriginError {
    tracing::warn!(%peer, %digest, error = %e, "peer could not supply the blob; next source");
    OriginError::Next { reason: e.reason(), suspect: e.is_unreachable() }
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
                    Err(_) if owner_is_waiting(&cluster, &peer, &digest, limit, true).await => continue,
                    Err(_) => {
                        stalled.store(true, Ordering::Relaxed);
                        let e = upstream::Error::Protocol(format!("no bytes from peer {peer} for {limit:?}"));
                        return Some((Err(e), None));
                    }
                }
            }
        }
    })
    .boxed()
}
