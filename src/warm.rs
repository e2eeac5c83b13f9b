//! The warm list, and the image walk it shares with `POST /prefetch` and `wharf prefetch`.
//!
//! This module owns: parsing image references (`docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:…`)
//! into a configured registry and repository; the walk tag → index → platform manifests → config and layers
//! ([`resolve`], [`fetch`]) over any [`Fetch`] source; the in-process source [`Local`], which goes through the
//! cache; and the background loop ([`spawn`]) that re-resolves every configured image every `warm.interval`
//! seconds, fetches what is missing and replaces the image's pins with exactly what it references now, so
//! when a tag moves the old digests lose their pins and become evictable.

use crate::cache::reader::Source;
use crate::cache::{BlobHandle, Cache, FillState};
use crate::config::WarmImage;
use crate::metrics::ImageLabel;
use crate::oci::manifest::{Descriptor, References};
use crate::oci::{AcceptSet, Digest, Reference, RepoName};
use crate::state::AppState;
use crate::upstream::{RegistryClient, RouteError, Upstreams};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Blobs of one image fetched at the same time (each large blob is itself fetched in parallel ranges).
const BLOB_CONCURRENCY: usize = 3;

/// Why an image could not be resolved or fetched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not of the form `[registry/]name[:tag][@digest]`.
    #[error("{0:?} is not an image reference (expected registry/name:tag or registry/name@sha256:…)")]
    BadImage(String),
    /// The name is invalid or names an unconfigured registry.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The cache, or the upstream behind it, failed (the message includes the causes).
    #[error("{0}")]
    Cache(String),
    /// A running wharf answered badly (`prefetch --server`).
    #[error("{0}")]
    Remote(String),
    /// A manifest's bytes are not a manifest or an index.
    #[error("manifest {0} is neither an image manifest nor an index")]
    BadManifest(Digest),
    /// The index has no manifest for a wanted platform.
    #[error("no manifest for platform {wanted} (the index has: {available})")]
    NoPlatform {
        /// The `os/arch[/variant]` asked for.
        wanted: String,
        /// What the index offers.
        available: String,
    },
}

impl Error {
    /// A cache error with its whole cause chain (`storage I/O: No space left on device`).
    pub fn cache(e: &dyn std::error::Error) -> Error {
        Error::Cache(chain(e))
    }
}

/// An error and its sources, joined with `: `.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Splits `name[:tag][@digest]` into the name and the reference (`latest` when neither is given; a digest
/// wins over a tag). The name keeps any registry prefix: routing decides what it means.
pub fn split_image(image: &str) -> Result<(&str, Reference), Error> {
    let bad = || Error::BadImage(image.to_owned());
    let (rest, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last..].rfind(':') {
        Some(i) => (&rest[..last + i], Some(&rest[last + i + 1..])),
        None => (rest, None),
    };
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d.parse().map_err(|_| bad())?),
        (None, Some(t)) => Reference::parse(t).map_err(|_| bad())?,
        (None, None) => Reference::Tag("latest".into()),
    };
    if name.is_empty() {
        return Err(bad());
    }
    Ok((name, reference))
}

/// An image reference resolved to a configured registry.
#[derive(Debug, Clone)]
pub struct Target {
    /// The registry's client.
    pub client: Arc<RegistryClient>,
    /// The repository as the registry knows it (`library/nginx` on Docker Hub).
    pub repo: RepoName,
    /// Tag or digest.
    pub reference: Reference,
}

/// Resolves an image reference the way requests are routed: the first component names the registry when it
/// is a configured one, else the default registry applies; Docker Hub single names get `library/`.
pub fn target(upstreams: &Upstreams, image: &str) -> Result<Target, Error> {
    let (name, reference) = split_image(image)?;
    let (client, repo) = upstreams.route(None, name)?;
    Ok(Target { client, repo, reference })
}

/// This node's platform as an index names it: `linux/` and the Go architecture name (`amd64`, `arm64`, …).
pub fn node_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        "loongarch64" => "loong64",
        other => other, // arm, riscv64, s390x, powerpc64, mips64 spell the same
    };
    format!("linux/{arch}")
}

/// `platforms`, or the node's own when empty.
pub fn platforms_or_node(platforms: &[String]) -> Vec<String> {
    if platforms.is_empty() { vec![node_platform()] } else { platforms.to_vec() }
}

/// Where the walk gets manifests and blobs: this process's cache ([`Local`]) or a running wharf over HTTP.
pub trait Fetch: Sync {
    /// GETs a manifest or index by tag or digest, accepting every manifest type: its digest and exact bytes.
    fn manifest(&self, reference: &Reference) -> impl Future<Output = Result<(Digest, Bytes), Error>> + Send;

    /// Makes sure a blob is fetched, reporting new bytes to `progress` as they arrive; returns its size.
    fn blob(
        &self,
        blob: &Descriptor,
        progress: &(dyn Fn(u64) + Sync),
    ) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// Everything one image needs, as found by [`resolve`].
#[derive(Debug, Clone)]
pub struct Plan {
    /// What the reference resolved to (an index or an image manifest).
    pub digest: Digest,
    /// Every manifest: the top one first, then the chosen platforms'.
    pub manifests: Vec<Digest>,
    /// Configs and layers of the chosen platforms, deduplicated.
    pub blobs: Vec<Descriptor>,
}

impl Plan {
    /// Sum of the blob sizes the manifests announce.
    pub fn total_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }

    /// Every digest the image references: manifests, then blobs (what the warm list pins).
    pub fn digests(&self) -> Vec<Digest> {
        self.manifests.iter().cloned().chain(self.blobs.iter().map(|b| b.digest.clone())).collect()
    }

    fn add_blobs(&mut self, refs: &References) {
        for b in refs.blobs() {
            if !self.blobs.iter().any(|have| have.digest == b.digest) {
                self.blobs.push(b.clone());
            }
        }
    }
}

/// Resolves `reference` and walks index → manifests of the wanted `platforms` (empty: the node's) → blobs.
/// Fetches manifests only; [`fetch`] gets the blobs.
pub async fn resolve<F: Fetch>(f: &F, reference: &Reference, platforms: &[String]) -> Result<Plan, Error> {
    let (top, bytes) = f.manifest(reference).await?;
    let refs = References::parse(&bytes).ok_or_else(|| Error::BadManifest(top.clone()))?;
    let mut plan = Plan { digest: top.clone(), manifests: vec![top.clone()], blobs: Vec::new() };
    if refs.manifests.is_empty() {
        plan.add_blobs(&refs);
        return Ok(plan);
    }
    for wanted in platforms_or_node(platforms) {
        let matches = |m: &&Descriptor| m.platform.as_ref().is_some_and(|p| p.matches(&wanted));
        let Some(child) = refs.manifests.iter().find(matches) else {
            let available: Vec<String> = (refs.manifests.iter().filter_map(|m| m.platform.as_ref()))
                .map(|p| [Some(p.os.as_str()), Some(&p.architecture), p.variant.as_deref()].into_iter().flatten())
                .map(|parts| parts.collect::<Vec<_>>().join("/"))
                .collect();
            return Err(Error::NoPlatform { wanted, available: available.join(", ") });
        };
        if plan.manifests.contains(&child.digest) {
            continue;
        }
        let (digest, bytes) = f.manifest(&Reference::Digest(child.digest.clone())).await?;
        let child_refs = References::parse(&bytes).ok_or_else(|| Error::BadManifest(digest.clone()))?;
        plan.manifests.push(digest);
        plan.add_blobs(&child_refs);
    }
    Ok(plan)
}

/// Fetches every blob of `plan` (a few at a time), stopping at the first failure. Returns the bytes.
pub async fn fetch<F: Fetch>(f: &F, plan: &Plan, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, Error> {
    // A hand-rolled window rather than stream combinators: their closures make the future's `Send` bound
    // fail to prove for callers that spawn it.
    let mut blobs = plan.blobs.iter();
    let mut running = FuturesUnordered::new();
    for blob in blobs.by_ref().take(BLOB_CONCURRENCY) {
        running.push(f.blob(blob, progress));
    }
    let mut total = 0;
    while let Some(size) = running.next().await {
        total += size?;
        if let Some(blob) = blobs.next() {
            running.push(f.blob(blob, progress));
        }
    }
    Ok(total)
}

/// Fetches through this process's cache: tags follow `tag_ttl` (and fall back to the last known manifest
/// when the upstream fails); blobs are filled once, or joined when a client is already pulling them.
pub struct Local<'a> {
    cache: &'a Cache,
    target: &'a Target,
}

impl<'a> Local<'a> {
    /// A source for `target` backed by `cache`.
    pub fn new(cache: &'a Cache, target: &'a Target) -> Self {
        Local { cache, target }
    }
}

impl Fetch for Local<'_> {
    async fn manifest(&self, reference: &Reference) -> Result<(Digest, Bytes), Error> {
        let (client, repo) = (&self.target.client, &self.target.repo);
        let answer = self.cache.manifest(client, repo, reference, &AcceptSet::all_manifests(), true).await;
        let answer = answer.map_err(|e| Error::cache(&e))?;
        Ok((answer.info.digest, answer.bytes.unwrap_or_default()))
    }

    async fn blob(&self, blob: &Descriptor, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, Error> {
        // `Cache::ensure_blob` without the progress; the handle's guard keeps the blob from eviction meanwhile.
        let (handle, _) = self
            .cache
            .blob(&self.target.client, &self.target.repo, &blob.digest)
            .await
            .map_err(|e| Error::cache(&e))?;
        let BlobHandle { source, size, guard: _guard } = handle;
        let fill = match source {
            Source::Committed(_) => {
                let size = size.unwrap_or(blob.size);
                progress(size);
                return Ok(size);
            }
            Source::Filling(fill) => fill,
        };
        let mut rx = fill.subscribe();
        let mut seen = 0;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                FillState::Starting => {}
                FillState::Streaming { written, .. } => {
                    progress(written.saturating_sub(seen));
                    seen = seen.max(written);
                }
                FillState::Done { size } => {
                    progress(size.saturating_sub(seen));
                    // A blob too large for the byte budget is served to its readers but never committed.
                    if !self.cache.store().has_blob(&blob.digest) {
                        return Err(Error::Cache(format!(
                            "{}: not cached (larger than the cache can hold)",
                            blob.digest
                        )));
                    }
                    return Ok(size);
                }
                FillState::Failed(e) => return Err(Error::cache(&*e)),
                FillState::Uncached { .. } => {
                    return Err(Error::Cache(format!("{}: not cached (the disk is full)", blob.digest)));
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Cache(format!("{}: the fill ended without a result", blob.digest)));
            }
        }
    }
}

/// What pulling one image did, for logs, the admin API and `wharf prefetch`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The image as given.
    pub image: String,
    /// Whether every manifest and blob is now cached.
    pub ok: bool,
    /// What the reference resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Manifests (index and platform manifests).
    pub manifests: usize,
    /// Configs and layers.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// Summarises the result of [`pull`].
    pub fn new(image: &str, result: &Result<Plan, Error>) -> Report {
        let (digest, manifests, blobs, bytes, error) = match result {
            Ok(p) => (Some(p.digest.clone()), p.manifests.len(), p.blobs.len(), p.total_bytes(), None),
            Err(e) => (None, 0, 0, 0, Some(e.to_string())),
        };
        Report { image: image.to_owned(), ok: result.is_ok(), digest, manifests, blobs, bytes, error }
    }
}

/// Resolves `image` through the cache and fetches whatever is missing. With `pin`, the image's pins (named
/// by `image`) become exactly what it references now: the new digests are pinned as soon as they are known,
/// the old ones are unpinned once everything new is cached, and a failure leaves the old pins in place.
pub async fn pull(
    state: &AppState,
    image: &str,
    platforms: &[String],
    pin: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Plan, Error> {
    let target = target(&state.upstreams, image)?;
    let cache = &state.cache;
    let local = Local::new(cache, &target);
    let plan = resolve(&local, &target.reference, platforms).await?;
    let old = if pin { cache.pins().map_err(|e| Error::cache(&e))?.remove(image).unwrap_or_default() } else { vec![] };
    if pin {
        let both: Vec<Digest> = old.iter().cloned().chain(plan.digests()).collect();
        cache.set_pins(image, &both).map_err(|e| Error::cache(&e))?;
    }
    let fetched = fetch(&local, &plan, progress).await;
    if pin {
        let keep = if fetched.is_ok() { plan.digests() } else { old };
        cache.set_pins(image, &keep).map_err(|e| Error::cache(&e))?;
    }
    fetched.map(|_| plan)
}

/// Pulls and pins one warm-list image, updating its metrics and logging the outcome.
pub async fn warm_one(state: &AppState, warm: &WarmImage) -> Report {
    let started = Instant::now();
    let result = pull(state, &warm.image, &warm.platforms, true, &|_| {}).await;
    let label = ImageLabel { image: warm.image.clone() };
    match &result {
        Ok(plan) => {
            state.metrics.warm_ready.get_or_create(&label).set(1);
            state.metrics.warm_last_success.get_or_create(&label).set(crate::cache::meta::now_secs() as i64);
            tracing::info!(
                image = %warm.image,
                digest = %plan.digest,
                manifests = plan.manifests.len(),
                blobs = plan.blobs.len(),
                bytes = plan.total_bytes(),
                ms = started.elapsed().as_millis() as u64,
                "warm image cached and pinned"
            );
        }
        Err(e) => {
            state.metrics.warm_ready.get_or_create(&label).set(0);
            tracing::warn!(image = %warm.image, error = %e, "warm image failed; keeping its previous pins");
        }
    }
    Report::new(&warm.image, &result)
}

/// One pass over the warm list, one image at a time; then drops the pins of images no longer listed.
pub async fn run_pass(state: &AppState) -> Vec<Report> {
    let mut reports = Vec::new();
    for warm in &state.config.warm.images {
        reports.push(warm_one(state, warm).await);
    }
    let listed = |name: &str| state.config.warm.images.iter().any(|w| w.image == name);
    match state.cache.pins() {
        Ok(pins) => {
            for name in pins.keys().filter(|n| !listed(n)) {
                tracing::info!(image = %name, "no longer on the warm list; unpinned");
                if let Err(e) = state.cache.set_pins(name, &[]) {
                    tracing::warn!(image = %name, error = %chain(&e), "unpinning failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %chain(&e), "reading pins failed"),
    }
    reports
}

/// Runs the warm list at start-up and every `warm.interval` seconds on `tasks` until `shutdown`. With an
/// empty list it runs once, to drop pins left by an earlier configuration.
pub fn spawn(state: AppState, tasks: &TaskTracker, shutdown: CancellationToken) {
    for warm in &state.config.warm.images {
        state.metrics.warm_ready.get_or_create(&ImageLabel { image: warm.image.clone() }).set(0);
    }
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(state.config.warm.interval.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = run_pass(&state) => {}
                // Fills already started run on to completion on the cache's own tasks.
                _ = shutdown.cancelled() => return,
            }
            if state.config.warm.images.is_empty() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_tags_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let tag = |t: &str| Reference::Tag(t.into());
        assert_eq!(split_image("docker.io/library/nginx:1.27").unwrap(), ("docker.io/library/nginx", tag("1.27")));
        assert_eq!(split_image("nginx").unwrap(), ("nginx", tag("latest")));
        assert_eq!(split_image("myreg:5000/team/app").unwrap(), ("myreg:5000/team/app", tag("latest")));
        assert_eq!(split_image("myreg:5000/team/app:v2").unwrap(), ("myreg:5000/team/app", tag("v2")));
        let pinned = format!("ghcr.io/org/app:v1@{d}");
        let (name, r) = split_image(&pinned).unwrap();
        assert_eq!((name, r.to_string()), ("ghcr.io/org/app", d.clone()));
        for bad in ["", ":v1", "x@sha256:zz", "x:-bad", "x@"] {
            assert!(split_image(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_like_requests() {
        let config = crate::config::Config::default();
        let up = Upstreams::from_config(&config, Arc::default()).unwrap();
        let t = target(&up, "nginx:1.27").unwrap();
        assert_eq!((t.client.name.as_str(), t.repo.as_str()), ("docker.io", "library/nginx"));
        let t = target(&up, "docker.io/nginx").unwrap();
        assert_eq!((t.client.name.as_str(), t.repo.as_str()), ("docker.io", "library/nginx"));
        let t = target(&up, "ghcr.io/org/app:v1").unwrap();
        assert_eq!((t.client.name.as_str(), t.repo.as_str()), ("ghcr.io", "org/app"));
        assert!(matches!(target(&up, "ghcr.io/Org/app"), Err(Error::Route(_))));
    }

    #[test]
    fn node_platform_is_a_linux_go_arch() {
        let p = node_platform();
        assert!(p.starts_with("linux/") && !p.contains("x86_64") && !p.contains("aarch64"), "{p}");
        assert_eq!(platforms_or_node(&[]), vec![p]);
        assert_eq!(platforms_or_node(&["linux/arm64".into()]), vec!["linux/arm64".to_string()]);
    }
}
