//! Manifests and tags: by-digest manifests are immutable and cached forever; tags are answered from cache
//! within the freshness window, revalidated with a HEAD after it, and served stale when the upstream fails.

use super::meta::{TagEntry, now_secs};
use super::{Cache, Error, Outcome};
use crate::metrics::{KindLabel, Metrics};
use crate::oci::{AcceptSet, Digest, Reference, RepoName};
use crate::upstream::{self, RegistryClient, flight};
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;

/// A manifest's identity, enough for a HEAD answer.
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    /// sha256 of the exact bytes.
    pub digest: Digest,
    /// Media type exactly as the upstream sent it.
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
}

/// A manifest answer: always the info; the bytes for GET.
#[derive(Debug, Clone)]
pub struct ManifestAnswer {
    /// Digest, type, size.
    pub info: ManifestInfo,
    /// Exact bytes (None for HEAD).
    pub bytes: Option<Bytes>,
    /// Hit, miss, revalidated or stale.
    pub outcome: Outcome,
}

/// Registries answer a tag with a platform manifest when lists are not accepted, so the cache keeps the
/// two answers apart.
fn tag_key(registry: &str, repo: &RepoName, tag: &str, accept: &AcceptSet) -> String {
    let class = if accept.accepts_index() { "index" } else { "single" };
    format!("{registry}/{repo}:{tag}#{class}")
}

/// A manifest body without a usable `Content-Type`: take its `mediaType` field, else assume OCI.
fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .ok()
        .and_then(|p| p.media_type)
        .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into())
}

/// Upstream work on manifests under way, by request: concurrent requests for the same manifest or tag
/// share one upstream request (Docker Hub counts every manifest GET against the pull rate limit).
pub(super) type Flights = flight::Flights<Result<ManifestAnswer, Arc<Error>>>;

/// The flights of one cache, counted in `wharf_upstream_requests_joined_total{kind="manifest"}`; each is
/// dropped after `limit` (see [`flight::limit`]).
pub(super) fn flights(metrics: &Metrics, limit: std::time::Duration) -> Flights {
    Flights::new(metrics.upstream_joined.get_or_create(&KindLabel { kind: "manifest" }).clone(), limit)
}

/// What one upstream request for a manifest depends on: method, registry, repository, reference, `Accept`,
/// and whether it may ask the owner peer (a peer's request never joins one that does: the two nodes could
/// end up waiting on each other).
fn flight_key(
    want_body: bool,
    registry: &str,
    repo: &RepoName,
    reference: &str,
    accept: &AcceptSet,
    forward: bool,
) -> String {
    let method = if want_body { "GET" } else { "HEAD" };
    let via = if forward { "" } else { " peer" };
    format!("{method} {registry}/{repo}:{reference} {}{via}", accept.header_value())
}

impl Cache {
    /// GET (`want_body`) or HEAD a manifest by tag or digest. Whatever needs the upstream is shared with
    /// concurrent requests for the same thing and runs to its end even if this request is dropped. With a
    /// cluster, the node that owns the tag (or digest) is asked before the upstream, so that one node per
    /// cluster revalidates each tag.
    pub async fn manifest(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
        want_body: bool,
    ) -> Result<ManifestAnswer, Error> {
        self.manifest_via(client, repo, reference, accept, want_body, true).await
    }

    /// [`Cache::manifest`] for a peer's request: never asks another peer.
    pub async fn manifest_for_peer(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
        want_body: bool,
    ) -> Result<ManifestAnswer, Error> {
        self.manifest_via(client, repo, reference, accept, want_body, false).await
    }

    async fn manifest_via(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        reference: &Reference,
        accept: &AcceptSet,
        want_body: bool,
        forward: bool,
    ) -> Result<ManifestAnswer, Error> {
        match reference {
            Reference::Digest(d) => {
                if let Some((info, bytes)) = self.read_manifest(d).await? {
                    let bytes = Some(bytes).filter(|_| want_body);
                    return Ok(ManifestAnswer { info, bytes, outcome: Outcome::Hit });
                }
                self.digest_miss(client, repo, d, accept, want_body, forward).await
            }
            Reference::Tag(t) => {
                let key = tag_key(&client.name, repo, t, accept);
                if let Some(entry) = self.fresh_tag(&key)? {
                    return self
                        .answer_from_entry(client, repo, &entry, accept, want_body, Outcome::Hit, forward)
                        .await;
                }
                let owner_key = format!("{}/{repo}:{t}", client.name);
                let flight = flight_key(want_body, &client.name, repo, t, accept, self.asks_peers(forward, &owner_key));
                let (this, client, repo, tag, accept) =
                    (self.clone(), client.clone(), repo.clone(), t.clone(), accept.clone());
                self.share(&flight, move || async move {
                    this.tag_upstream(&client, &repo, &tag, &key, &accept, want_body, forward).await
                })
                .await
            }
        }
    }

    /// Runs `work` once for every concurrent caller with the same `key`; a caller that joined reports a miss
    /// as coalesced.
    async fn share<F>(&self, key: &str, work: impl FnOnce() -> F) -> Result<ManifestAnswer, Error>
    where
        F: Future<Output = Result<ManifestAnswer, Error>> + Send + 'static,
    {
        let shared = || {
            let work = work();
            async move { work.await.map_err(Arc::new) }
        };
        let (answer, joined) = self.shared.manifest_flights.run(key, shared).await.map_err(|_| Error::Abandoned)?;
        let mut answer = answer.map_err(Error::unshare)?;
        if joined && answer.outcome == Outcome::Miss {
            answer.outcome = Outcome::Coalesced;
        }
        Ok(answer)
    }

    /// Whether a request for `key` (a digest, or `<registry>/<repo>:<tag>`) will ask a peer: a client's
    /// request when some peer ranks above this node. One that will not (the owner's own clients) shares its
    /// upstream request with the peers' requests for the same thing: one upstream request per cluster.
    fn asks_peers(&self, forward: bool, key: &str) -> bool {
        forward && self.shared.cluster.get().is_some_and(|c| !c.sources(key).is_empty())
    }

    /// The tag's entry, if within the freshness window.
    fn fresh_tag(&self, key: &str) -> Result<Option<TagEntry>, Error> {
        Ok(self.shared.meta.tag(key)?.filter(|e| self.is_fresh(e, now_secs())))
    }

    /// Whether `entry` was checked with the upstream within `tag_ttl` of `now`.
    fn is_fresh(&self, entry: &TagEntry, now: u64) -> bool {
        now < entry.checked_at.saturating_add(self.shared.tag_ttl)
    }

    /// A manifest by digest that is not cached: asks the upstream, shared with concurrent requests.
    async fn digest_miss(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        digest: &Digest,
        accept: &AcceptSet,
        want_body: bool,
        forward: bool,
    ) -> Result<ManifestAnswer, Error> {
        let key = digest.to_string();
        let flight = flight_key(want_body, &client.name, repo, &key, accept, self.asks_peers(forward, &key));
        let (this, client, repo, digest, accept) =
            (self.clone(), client.clone(), repo.clone(), digest.clone(), accept.clone());
        self.share(&flight, move || async move {
            this.digest_upstream(&client, &repo, &digest, &accept, want_body, forward).await
        })
        .await
    }

    async fn digest_upstream(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        digest: &Digest,
        accept: &AcceptSet,
        want_body: bool,
        forward: bool,
    ) -> Result<ManifestAnswer, Error> {
        // A flight that ended just before this one started may have stored it.
        if let Some((info, bytes)) = self.read_manifest(digest).await? {
            return Ok(ManifestAnswer { info, bytes: Some(bytes).filter(|_| want_body), outcome: Outcome::Hit });
        }
        let key = digest.to_string();
        if forward
            && let Some((info, bytes, _)) = self.ask_owner(client, repo, &key, &key, accept, want_body).await
            && info.digest == *digest
        {
            return Ok(ManifestAnswer { info, bytes, outcome: Outcome::Miss });
        }
        if let Some((info, bytes)) = self.bucket_manifest(client, repo, digest).await {
            return Ok(ManifestAnswer { info, bytes: Some(bytes).filter(|_| want_body), outcome: Outcome::Miss });
        }
        if !want_body {
            let head = client.head_manifest(repo, &digest.to_string(), accept).await?;
            if let (Some(size), false) = (head.size, head.media_type.is_empty()) {
                let info = ManifestInfo { digest: digest.clone(), media_type: head.media_type, size };
                return Ok(ManifestAnswer { info, bytes: None, outcome: Outcome::Miss });
            }
        }
        let (info, bytes) = self.fetch_manifest(client, repo, &digest.to_string(), accept, Some(digest)).await?;
        Ok(ManifestAnswer { info, bytes: Some(bytes).filter(|_| want_body), outcome: Outcome::Miss })
    }

    /// A tag outside its freshness window (or unknown): learnt, revalidated with a HEAD, or served stale.
    // Each argument is one fact about the request; bundling them would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn tag_upstream(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        tag: &str,
        key: &str,
        accept: &AcceptSet,
        want_body: bool,
        forward: bool,
    ) -> Result<ManifestAnswer, Error> {
        let known = self.shared.meta.tag(key)?;
        let now = now_secs();
        // A flight that ended just before this one started may have refreshed it.
        if let Some(entry) = known.as_ref().filter(|e| self.is_fresh(e, now)) {
            return self.answer_from_entry(client, repo, entry, accept, want_body, Outcome::Hit, forward).await;
        }
        // The tag's owner keeps it fresh for the cluster: one upstream request per tag, not one per node.
        let owner_key = format!("{}/{repo}:{tag}", client.name);
        let asked = if forward { self.ask_owner(client, repo, tag, &owner_key, accept, want_body).await } else { None };
        if let Some((info, bytes, stale)) = asked {
            let outcome = match &known {
                _ if stale => Outcome::Stale,
                Some(e) if e.digest == info.digest => Outcome::Revalidated,
                _ => Outcome::Miss,
            };
            // A stale answer (the owner's upstream failed) is no check: a known entry keeps its time, and a new
            // one is recorded as due, so the next request asks again.
            if !(stale && known.is_some()) {
                let checked_at = if stale { 0 } else { now };
                let entry = TagEntry {
                    digest: info.digest.clone(),
                    media_type: info.media_type.clone(),
                    size: info.size,
                    checked_at,
                };
                self.shared.meta.put_tag(key, &entry)?;
            }
            return Ok(ManifestAnswer { info, bytes, outcome });
        }
        let Some(entry) = known else {
            if !want_body {
                // A HEAD is free on Docker Hub while a GET counts as a pull: learn the tag with a HEAD.
                let head = client.head_manifest(repo, tag, accept).await?;
                if let (Some(digest), Some(size), false) = (head.digest, head.size, head.media_type.is_empty()) {
                    let entry = TagEntry { digest, media_type: head.media_type, size, checked_at: now };
                    self.shared.meta.put_tag(key, &entry)?;
                    return self.answer_from_entry(client, repo, &entry, accept, false, Outcome::Miss, forward).await;
                }
            }
            return self.fetch_tag(client, repo, tag, key, accept, want_body).await;
        };
        match client.head_manifest(repo, tag, accept).await {
            Ok(head) if head.digest.as_ref() == Some(&entry.digest) => {
                let entry = TagEntry { checked_at: now, ..entry };
                self.shared.meta.put_tag(key, &entry)?;
                self.answer_from_entry(client, repo, &entry, accept, want_body, Outcome::Revalidated, forward).await
            }
            Ok(_) => self.fetch_tag(client, repo, tag, key, accept, want_body).await,
            Err(e) if e.is_unavailable() => {
                tracing::warn!(registry = %client.name, %repo, tag, error = %e, "upstream failed; serving last known manifest");
                match self.answer_from_entry(client, repo, &entry, accept, want_body, Outcome::Stale, forward).await {
                    Ok(answer) => Ok(answer),
                    Err(_) => Err(e.into()),
                }
            }
            Err(upstream::Error::NotFound) => {
                self.shared.meta.remove_tag(key)?;
                Err(upstream::Error::NotFound.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// GETs a tag upstream (by digest when a HEAD already told it), stores it and records the tag.
    async fn fetch_tag(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        tag: &str,
        key: &str,
        accept: &AcceptSet,
        want_body: bool,
    ) -> Result<ManifestAnswer, Error> {
        let (info, bytes) = self.fetch_manifest(client, repo, tag, accept, None).await?;
        let entry = TagEntry {
            digest: info.digest.clone(),
            media_type: info.media_type.clone(),
            size: info.size,
            checked_at: now_secs(),
        };
        self.shared.meta.put_tag(key, &entry)?;
        Ok(ManifestAnswer { info, bytes: Some(bytes).filter(|_| want_body), outcome: Outcome::Miss })
    }

    // Each argument is one fact about the request; bundling them would only rename them.
    #[allow(clippy::too_many_arguments)]
    async fn answer_from_entry(
        &self,
        client: &Arc<RegistryClient>,
        repo: &RepoName,
        entry: &TagEntry,
        accept: &AcceptSet,
        want_body: bool,
        outcome: Outcome,
        forward: bool,
    ) -> Result<ManifestAnswer, Error> {
        if !want_body {
            // A HEAD (the kubelet's `Always` policy) needs only what the tag entry records: no disk read.
            let info =
                ManifestInfo { digest: entry.digest.clone(), media_type: entry.media_type.clone(), size: entry.size };
            return Ok(ManifestAnswer { info, bytes: None, outcome });
        }
        let cached = self.read_manifest(&entry.digest).await?;
        let (info, bytes) = match cached {
            Some(found) => found,
            None if outcome == Outcome::Stale => return Err(Error::Io(std::io::ErrorKind::NotFound.into())),
            None => {
                let answer = self.digest_miss(client, repo, &entry.digest, accept, true, forward).await?;
                (answer.info, answer.bytes.unwrap_or_default())
            }
        };
        Ok(ManifestAnswer { info, bytes: Some(bytes).filter(|_| want_body), outcome })
    }

    /// GETs a manifest, checks it against `expected` (or the upstream's `Docker-Content-Digest`), stores it.
    async fn fetch_manifest(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        reference: &str,
        accept: &AcceptSet,
        expected: Option<&Digest>,
    ) -> Result<(ManifestInfo, Bytes), Error> {
        let (head, bytes) = client.get_manifest(repo, reference, accept).await?;
        let digest = match expected.or(head.digest.as_ref()) {
            Some(d) if d.matches(&bytes) => d.clone(),
            Some(d) => {
                return Err(Error::DigestMismatch { expected: d.clone(), actual: Digest::sha256_of(&bytes) });
            }
            None => Digest::sha256_of(&bytes),
        };
        let media_type = if head.media_type.is_empty() || head.media_type == "text/plain" {
            sniff_media_type(&bytes)
        } else {
            head.media_type
        };
        let info = ManifestInfo { digest, media_type, size: bytes.len() as u64 };
        self.store_manifest(client, repo, &info, &bytes).await?;
        if let Some(bucket) = self.shared.bucket.get() {
            // New to the cluster: shared by digest through the bucket (tags stay with the nodes).
            let (bucket, info, bytes) = (bucket.clone(), info.clone(), bytes.clone());
            self.shared.tasks.spawn(async move { bucket.put_manifest(&info.digest, &info.media_type, bytes).await });
        }
        Ok((info, bytes))
    }

    /// A manifest by digest from the bucket, verified and stored; `None` when the bucket has no good copy.
    async fn bucket_manifest(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<(ManifestInfo, Bytes)> {
        let (media_type, bytes) = self.shared.bucket.get()?.manifest(digest).await?;
        if !digest.matches(&bytes) || media_type.is_empty() {
            tracing::error!(%digest, "the bucket's copy of a manifest failed verification; asking the upstream");
            self.shared.bucket.get()?.mark_corrupt(digest);
            return None;
        }
        let info = ManifestInfo { digest: digest.clone(), media_type, size: bytes.len() as u64 };
        if let Err(e) = self.store_manifest(client, repo, &info, &bytes).await {
            tracing::warn!(%digest, error = %e, "storing a manifest from the bucket");
        }
        Some((info, bytes))
    }

    /// Stores verified manifest bytes and records that `repo` references them. A full disk only costs the
    /// cache: the bytes are still the answer.
    async fn store_manifest(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        info: &ManifestInfo,
        bytes: &Bytes,
    ) -> Result<(), Error> {
        let (store, digest, media_type) = (self.shared.store.clone(), info.digest.clone(), info.media_type.clone());
        let to_write = bytes.clone();
        match tokio::task::spawn_blocking(move || store.write_manifest(&digest, &media_type, &to_write)).await? {
            Ok(()) => {}
            // Verified bytes are still the answer: a full disk costs the cache, not the client.
            Err(e) if super::is_disk_full(&e) => {
                tracing::warn!(digest = %info.digest, error = %e, "disk full: manifest served without caching");
                let reason = crate::metrics::ReasonLabel { reason: "disk_full" };
                self.shared.metrics.uncached.get_or_create(&reason).inc();
            }
            Err(e) => return Err(e.into()),
        }
        self.record_ref(&client.name, repo, &info.digest)
    }

    /// A manifest from the peers that own `key` (best first), verified and stored, and whether the peer
    /// served it stale (its upstream failed); `None` when none could answer, and the caller asks the
    /// upstream itself.
    async fn ask_owner(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        reference: &str,
        key: &str,
        accept: &AcceptSet,
        want_body: bool,
    ) -> Option<(ManifestInfo, Option<Bytes>, bool)> {
        let cluster = self.shared.cluster.get()?;
        let accept_value = if accept.is_empty() { AcceptSet::all_manifests() } else { accept.clone() }.header_value();
        for peer in cluster.sources(key) {
            let answer =
                cluster.client().manifest(&peer, &client.name, repo, reference, &accept_value, want_body).await;
            let (head, bytes, stale) = match answer {
                Ok(m) => (m.head, m.bytes, m.stale),
                Err(e) => {
                    tracing::warn!(%peer, reference, error = %e, "owner could not supply the manifest; next source");
                    cluster.count_fallback(e.reason());
                    if e.is_unreachable() {
                        cluster.suspect(&peer, e.reason());
                    }
                    continue;
                }
            };
            let (Some(digest), Some(size), false) = (head.digest, head.size, head.media_type.is_empty()) else {
                cluster.count_fallback("protocol");
                continue;
            };
            let info = ManifestInfo { digest, media_type: head.media_type, size };
            if let Some(bytes) = &bytes {
                if !info.digest.matches(bytes) || bytes.len() as u64 != size {
                    cluster.count_corrupt();
                    cluster.suspect(&peer, "sent a manifest that failed verification");
                    continue;
                }
                if let Err(e) = self.store_manifest(client, repo, &info, bytes).await {
                    tracing::warn!(digest = %info.digest, error = %e, "storing a manifest from a peer");
                }
            }
            return Some((info, bytes, stale));
        }
        None
    }

    async fn read_manifest(&self, digest: &Digest) -> Result<Option<(ManifestInfo, Bytes)>, Error> {
        let store = self.shared.store.clone();
        let found = match store.memo_manifest(digest) {
            Some(found) => Some(found),
            None => {
                let d = digest.clone();
                tokio::task::spawn_blocking(move || store.read_manifest(&d)).await??
            }
        };
        Ok(found.map(|(media_type, bytes)| {
            let info = ManifestInfo { digest: digest.clone(), media_type, size: bytes.len() as u64 };
            (info, bytes)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_keys_split_by_index_acceptance() {
        let repo = RepoName::parse("a/b").unwrap();
        let all = AcceptSet::all_manifests();
        let single = AcceptSet::from_headers(["application/vnd.oci.image.manifest.v1+json"]);
        assert_ne!(tag_key("r", &repo, "t", &all), tag_key("r", &repo, "t", &single));
    }

    #[test]
    fn sniffs_media_type() {
        assert_eq!(
            sniff_media_type(br#"{"mediaType":"application/vnd.oci.image.index.v1+json"}"#),
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(sniff_media_type(b"not json"), "application/vnd.oci.image.manifest.v1+json");
    }
}
