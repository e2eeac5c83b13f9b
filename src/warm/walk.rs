//! The image walk shared by the warm list, the admin API's `POST /prefetch` and `wharf prefetch`: parsing an
//! image reference (`docker.io/library/nginx:1.27`, `ghcr.io/org/app@sha256:…`) into a configured registry and
//! repository ([`target`]), then tag → index → the wanted platforms' manifests → config and layers
//! ([`resolve`]), and fetching the blobs a few at a time ([`fetch`]) from any [`Fetch`] source. [`Local`] is
//! the source that goes through this process's cache.

use crate::cache::reader::Source;
use crate::cache::{BlobHandle, Cache, FillState};
use crate::oci::manifest::{Descriptor, References};
use crate::oci::{AcceptSet, Digest, Reference, RepoName};
use crate::upstream::{RegistryClient, RouteError, Upstreams};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;

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
    /// Indexes nest deeper than [`MAX_INDEX_DEPTH`] below the image's top manifest.
    #[error("index {digest} (under {top}) nests indexes deeper than the limit of {limit} levels")]
    TooDeep {
        /// The image's top manifest.
        top: Digest,
        /// The index found past the limit.
        digest: Digest,
        /// [`MAX_INDEX_DEPTH`].
        limit: usize,
    },
    /// Searching nested indexes for a platform read more than [`MAX_SEARCH_READS`] manifests.
    #[error("index {top}: more than {limit} nested manifests read while searching for a platform")]
    TooWide {
        /// The image's top manifest.
        top: Digest,
        /// [`MAX_SEARCH_READS`].
        limit: usize,
    },
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
        Error::Cache(crate::telemetry::chain(e))
    }
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
    // Validated even when a digest overrides it, as in distribution's reference grammar.
    let tag = tag.map(|t| Reference::parse(t).map_err(|_| bad())).transpose()?;
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d.parse().map_err(|_| bad())?),
        (None, Some(t)) => t,
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
    /// Sum of the blob sizes the manifests announce, saturating: the sizes are the upstream's claims.
    pub fn total_bytes(&self) -> u64 {
        self.blobs.iter().fold(0, |sum, b| sum.saturating_add(b.size))
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

/// Indexes on the way from the top manifest to an image manifest, the top one included. An image nested deeper
/// is refused (an error for that image), which also bounds a walk that could otherwise never end: content
/// addressing rules out cycles, so only depth is left to limit.
pub const MAX_INDEX_DEPTH: usize = 4;

/// Manifests one platform's search may read below the top index. Depth alone does not bound a search: wide
/// nested indexes multiply, and an upstream could serve an index of thousands of nested indexes.
pub const MAX_SEARCH_READS: usize = 256;

/// What a walk reports while it runs, for progress displays and the admin API's prefetch jobs.
pub trait Progress: Sync {
    /// The image is resolved: `plan` is what will be fetched.
    fn resolved(&self, _plan: &Plan) {}
    /// `n` more bytes of the image's blobs are cached (or were found cached).
    fn advance(&self, _n: u64) {}
}

/// No progress reporting.
impl Progress for () {}

/// Resolves `reference` and walks index → manifests of the wanted `platforms` (empty: the node's) → blobs,
/// following nested indexes up to [`MAX_INDEX_DEPTH`]. Fetches manifests only; [`fetch`] gets the blobs.
pub async fn resolve<F: Fetch>(f: &F, reference: &Reference, platforms: &[String]) -> Result<Plan, Error> {
    let (top, bytes) = f.manifest(reference).await?;
    let refs = References::parse(&bytes).ok_or_else(|| Error::BadManifest(top.clone()))?;
    let mut plan = Plan { digest: top.clone(), manifests: vec![top.clone()], blobs: Vec::new() };
    if refs.manifests.is_empty() {
        plan.add_blobs(&refs);
        return Ok(plan);
    }
    for wanted in platforms_or_node(platforms) {
        for (digest, child) in choose(f, &top, &refs, &wanted).await? {
            if !plan.manifests.contains(&digest) {
                plan.manifests.push(digest);
                plan.add_blobs(&child);
            }
        }
    }
    Ok(plan)
}

/// `os/arch[/variant]` of an index entry.
fn platform_name(p: &crate::oci::manifest::Platform) -> String {
    let parts = [Some(p.os.as_str()), Some(p.architecture.as_str()), p.variant.as_deref()];
    parts.into_iter().flatten().collect::<Vec<_>>().join("/")
}

/// Finds the `wanted` platform below the index `top` (digest `top_digest`), depth first and in entry order:
/// entries whose platform matches are read, and so are nested indexes that name no platform (a platform on an
/// index entry narrows what it holds). The first image manifest reached through a matching entry wins.
/// Returns the manifests read on the way to it below the top, the image manifest last.
async fn choose<F: Fetch>(
    f: &F,
    top_digest: &Digest,
    top: &References,
    wanted: &str,
) -> Result<Vec<(Digest, References)>, Error> {
    // One iterator of untried entries per open index (the top first), and the open nested indexes.
    let mut levels = vec![top.manifests.clone().into_iter()];
    let mut path: Vec<(Digest, References)> = Vec::new();
    let mut available: Vec<String> = Vec::new();
    // Indexes already searched: the same digest holds the same entries, so it cannot hold the platform now.
    let mut searched: Vec<Digest> = Vec::new();
    let mut reads = 0;
    // A branch past the depth limit is skipped, not fatal: a later entry may reach the platform in bounds.
    let mut too_deep = None;
    while let Some(level) = levels.last_mut() {
        let Some(entry) = level.next() else {
            levels.pop();
            path.pop();
            continue;
        };
        match &entry.platform {
            Some(p) => {
                let name = platform_name(p);
                if !available.contains(&name) {
                    available.push(name);
                }
                if !p.matches(wanted) {
                    continue;
                }
            }
            None if !crate::oci::is_index_type(&entry.media_type) => continue,
            None => {}
        }
        if searched.contains(&entry.digest) {
            continue;
        }
        reads += 1;
        if reads > MAX_SEARCH_READS {
            return Err(Error::TooWide { top: top_digest.clone(), limit: MAX_SEARCH_READS });
        }
        let (digest, bytes) = f.manifest(&Reference::Digest(entry.digest.clone())).await?;
        let refs = References::parse(&bytes).ok_or_else(|| Error::BadManifest(digest.clone()))?;
        if !refs.manifests.is_empty() {
            if levels.len() >= MAX_INDEX_DEPTH {
                too_deep.get_or_insert(Error::TooDeep { top: top_digest.clone(), digest, limit: MAX_INDEX_DEPTH });
                continue;
            }
            searched.push(digest.clone());
            levels.push(refs.manifests.clone().into_iter());
            path.push((digest, refs));
            continue;
        }
        if entry.platform.is_none() {
            continue; // announced as an index but holds an image manifest of no stated platform
        }
        path.push((digest, refs));
        return Ok(path);
    }
    Err(too_deep.unwrap_or_else(|| Error::NoPlatform { wanted: wanted.to_owned(), available: available.join(", ") }))
}

/// Fetches every blob of `plan` (a few at a time), stopping at the first failure; new bytes go to
/// `progress`. Returns the bytes.
pub async fn fetch<F: Fetch>(f: &F, plan: &Plan, progress: &dyn Progress) -> Result<u64, Error> {
    let advance = |n| progress.advance(n);
    // A hand-rolled window rather than stream combinators: their closures make the future's `Send` bound
    // fail to prove for callers that spawn it.
    let mut blobs = plan.blobs.iter();
    let mut running = FuturesUnordered::new();
    for blob in blobs.by_ref().take(BLOB_CONCURRENCY) {
        running.push(f.blob(blob, &advance));
    }
    let mut total = 0;
    while let Some(size) = running.next().await {
        total += size?;
        if let Some(blob) = blobs.next() {
            running.push(f.blob(blob, &advance));
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
        // Found by fuzzing: a malformed tag before a digest was ignored rather than refused.
        let bad_tag = format!("x:-bad@{d}");
        for bad in ["", ":v1", "x@sha256:zz", "x:-bad", "x@", &bad_tag] {
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
    fn total_bytes_saturates() {
        // Found by fuzzing: two layers claiming `u64::MAX` bytes overflowed the sum (a panic in debug builds).
        let blob = |hex: char, size| Descriptor {
            digest: format!("sha256:{}", hex.to_string().repeat(64)).parse().unwrap(),
            size,
            media_type: String::new(),
            platform: None,
        };
        let d = blob('0', 0).digest;
        let plan = Plan { digest: d.clone(), manifests: vec![d], blobs: vec![blob('a', u64::MAX), blob('b', 1)] };
        assert_eq!(plan.total_bytes(), u64::MAX);
    }

    /// Manifests by digest (the top one also under the tag `top`).
    struct Manifests(std::collections::HashMap<String, Bytes>);

    impl Manifests {
        fn put(&mut self, body: serde_json::Value) -> Digest {
            let bytes = Bytes::from(body.to_string());
            let digest = Digest::sha256_of(&bytes);
            self.0.insert(digest.to_string(), bytes);
            digest
        }
    }

    impl Fetch for Manifests {
        async fn manifest(&self, reference: &Reference) -> Result<(Digest, Bytes), Error> {
            let bytes = self.0.get(&reference.to_string()).cloned();
            let bytes = bytes.ok_or_else(|| Error::Cache(format!("{reference}: not found")))?;
            Ok((Digest::sha256_of(&bytes), bytes))
        }

        async fn blob(&self, blob: &Descriptor, _: &(dyn Fn(u64) + Sync)) -> Result<u64, Error> {
            Ok(blob.size)
        }
    }

    #[tokio::test]
    async fn nested_indexes_are_searched_in_order_and_backtracked() {
        use serde_json::json;
        let index_type = "application/vnd.oci.image.index.v1+json";
        let entry = |d: &Digest, mt: &str, arch: Option<&str>| match arch {
            Some(a) => json!({"mediaType": mt, "digest": d, "platform": {"os": "linux", "architecture": a}}),
            None => json!({"mediaType": mt, "digest": d}),
        };
        let mut m = Manifests(Default::default());
        let blob = |hex: char| json!({"digest": format!("sha256:{}", hex.to_string().repeat(64)), "size": 10});
        let amd = m.put(json!({"config": blob('1'), "layers": [blob('2')]}));
        let arm = m.put(json!({"config": blob('3'), "layers": [blob('4')]}));
        // The first nested index (no platform) has only arm64: searched, then left for the second.
        let only_arm = m.put(json!({"manifests": [entry(&arm, "", Some("arm64"))]}));
        let only_amd = m.put(json!({"manifests": [entry(&amd, "", Some("amd64"))]}));
        let top = json!({"manifests": [entry(&only_arm, index_type, None), entry(&only_amd, index_type, None)]});
        let top = m.put(top);
        m.0.insert("top".into(), m.0[&top.to_string()].clone());
        let tag = Reference::Tag("top".into());

        let plan = resolve(&m, &tag, &["linux/amd64".into()]).await.unwrap();
        assert_eq!(plan.manifests, vec![top.clone(), only_amd.clone(), amd.clone()]);
        assert_eq!(plan.blobs.len(), 2);
        let plan = resolve(&m, &tag, &["linux/arm64".into(), "linux/amd64".into()]).await.unwrap();
        assert_eq!(plan.manifests, vec![top, only_arm.clone(), arm, only_amd.clone(), amd.clone()]);
        assert_eq!(plan.blobs.len(), 4);
        match resolve(&m, &tag, &["linux/s390x".into()]).await {
            Err(Error::NoPlatform { available, .. }) => assert_eq!(available, "linux/arm64, linux/amd64"),
            other => panic!("{other:?}"),
        }

        // Deep: a branch past the depth limit is skipped for a later one in bounds, and is the error only when
        // nothing else holds the platform.
        let mut chain = only_amd.clone();
        for _ in 0..MAX_INDEX_DEPTH {
            chain = m.put(json!({"manifests": [entry(&chain, index_type, None)]}));
        }
        let deep_then_flat =
            m.put(json!({"manifests": [entry(&chain, index_type, None), entry(&only_amd, index_type, None)]}));
        let plan = resolve(&m, &Reference::Digest(deep_then_flat), &["linux/amd64".into()]).await.unwrap();
        assert_eq!(plan.manifests.last(), Some(&amd));
        let only_deep = m.put(json!({"manifests": [entry(&chain, index_type, None)]}));
        let found = resolve(&m, &Reference::Digest(only_deep), &["linux/amd64".into()]).await;
        assert!(matches!(found, Err(Error::TooDeep { .. })), "{found:?}");

        // Wide: the same nested index listed many times is searched once; many distinct ones hit the bound.
        let same: Vec<_> = (0..10 * MAX_SEARCH_READS).map(|_| entry(&only_arm, index_type, None)).collect();
        let wide = m.put(json!({"manifests": same}));
        let found = resolve(&m, &Reference::Digest(wide), &["linux/amd64".into()]).await;
        assert!(matches!(found, Err(Error::NoPlatform { .. })), "{found:?}");
        let distinct: Vec<_> = (0..=MAX_SEARCH_READS)
            .map(|n| m.put(json!({"manifests": [], "n": n})))
            .map(|d| entry(&d, index_type, None))
            .collect();
        let wide = m.put(json!({"manifests": distinct}));
        let found = resolve(&m, &Reference::Digest(wide), &["linux/amd64".into()]).await;
        assert!(matches!(found, Err(Error::TooWide { .. })), "{found:?}");
    }

    #[test]
    fn node_platform_is_a_linux_go_arch() {
        let p = node_platform();
        assert!(p.starts_with("linux/") && !p.contains("x86_64") && !p.contains("aarch64"), "{p}");
        assert_eq!(platforms_or_node(&[]), vec![p]);
        assert_eq!(platforms_or_node(&["linux/arm64".into()]), vec!["linux/arm64".to_string()]);
    }
}
