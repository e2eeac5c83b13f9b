//! The warm list: images kept pulled and pinned against eviction.
//!
//! [`spawn`] runs a pass at start-up and every `warm.interval` seconds: each configured image is resolved
//! through the cache, whatever is missing is fetched ([`resolve`], [`fetch`]), and the image's pins become
//! exactly what it references now, so when a tag moves the old digests lose their pins and become evictable.
//! [`pull`] is the same step for one image, with or without pins (the admin API's prefetch jobs: without).
//! Images marked `into_runtime` then go into the node's container runtime ([`runtime`]).

pub mod runtime;
mod walk;

pub(crate) use crate::telemetry::chain;
pub use walk::{
    Error, Fetch, Local, MAX_INDEX_DEPTH, MAX_SEARCH_READS, Plan, Progress, Target, fetch, node_platform,
    platforms_or_node, resolve, split_image, target,
};

use crate::config::WarmImage;
use crate::metrics::ImageLabel;
use crate::oci::Digest;
use crate::state::AppState;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What pulling one warm-list image did (each pass returns one per image).
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
/// `progress` hears of the plan once resolved, then of the bytes as they are cached.
pub async fn pull(
    state: &AppState,
    image: &str,
    platforms: &[String],
    pin: bool,
    progress: &dyn Progress,
) -> Result<Plan, Error> {
    let target = target(&state.upstreams, image)?;
    let cache = &state.cache;
    let local = Local::new(cache, &target);
    let plan = resolve(&local, &target.reference, platforms).await?;
    progress.resolved(&plan);
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
    let result = pull(state, &warm.image, &warm.platforms, true, &()).await;
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

/// What each image of a pass asks of the runtime: the `into_runtime` ones, by the reference the runtime
/// knows them by.
fn wanted_in_runtime(state: &AppState, reports: &[Report]) -> Vec<runtime::Wanted> {
    let listed = state.config.warm.images.iter().zip(reports);
    let into = listed.filter(|(warm, _)| warm.into_runtime);
    into.map(|(warm, report)| runtime::Wanted {
        image: warm.image.clone(),
        reference: reference_in_runtime(state, warm),
        digest: report.digest.clone().filter(|_| report.ok),
        error: report.error.clone(),
        pin: warm.pin_in_runtime,
    })
    .collect()
}

/// The reference the runtime knows a warm image by (the entry as written when it does not route).
fn reference_in_runtime(state: &AppState, warm: &WarmImage) -> String {
    match target(&state.upstreams, &warm.image) {
        Ok(t) => runtime::runtime_reference(&t.client.name, t.repo.as_str(), &t.reference),
        Err(_) => warm.image.clone(),
    }
}

/// Runs the warm list at start-up and every `warm.interval` seconds on `tasks` until `shutdown`. With an
/// empty list it runs once, to drop pins left by an earlier configuration. With a runtime endpoint, each
/// pass's outcome then goes to the runtime worker, whose findings the returned board holds.
pub fn spawn(state: AppState, tasks: &TaskTracker, shutdown: CancellationToken) -> Arc<runtime::Board> {
    let board = Arc::new(runtime::Board::default());
    for warm in &state.config.warm.images {
        let label = ImageLabel { image: warm.image.clone() };
        state.metrics.warm_ready.get_or_create(&label).set(0);
        if warm.into_runtime {
            state.metrics.warm_in_runtime.get_or_create(&label).set(0);
            state.metrics.warm_runtime_pinned.get_or_create(&label).set(0);
            let reference = reference_in_runtime(&state, warm);
            let waiting = Some("not checked yet: waiting for the first warm pass".to_owned());
            board.set(&warm.image, runtime::InRuntime { reference, error: waiting, ..Default::default() });
        }
    }
    let to_runtime = (!state.config.warm.runtime_endpoint.is_empty()).then(|| {
        let (settings, metrics) = (state.config.warm.clone(), state.metrics.clone());
        runtime::spawn(settings, metrics, board.clone(), tasks, shutdown.clone())
    });
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(state.config.warm.interval.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let reports = tokio::select! {
                reports = run_pass(&state) => reports,
                // Fills already started run on to completion on the cache's own tasks.
                _ = shutdown.cancelled() => return,
            };
            if let Some(tx) = &to_runtime {
                // The worker takes the newest outcome when it is free: a slow runtime never delays a pass.
                tx.send_replace(wanted_in_runtime(&state, &reports));
            }
            if state.config.warm.images.is_empty() {
                return;
            }
        }
    });
    board
}
