//! Warm images pulled into the node's container runtime (`into_runtime`), and optionally pinned there
//! against the kubelet's image GC (`pin_in_runtime`).
//!
//! After every warm pass the list's outcome (each image's digest in wharf) goes to a worker of its own
//! ([`spawn`]), so a runtime that is missing, slow or failing never delays the warm list or anything else:
//! the worker syncs the runtime to the newest outcome, records what it found on the [`Board`] (the admin
//! API's pins view) and in metrics, and tries again after the next pass.

use super::chain;
use crate::config::WarmSettings;
use crate::metrics::{ImageLabel, Metrics};
use crate::oci::{Digest, Reference};
use crate::runtime::{Runtime, RuntimeImage, RuntimeVersion};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the runtime holds of one warm image, as last checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InRuntime {
    /// The reference the runtime knows the image by (`docker.io/library/nginx:1.27`).
    pub reference: String,
    /// wharf's current digest of the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Whether the runtime holds the image at that digest.
    pub present: bool,
    /// Whether the runtime's record carries the pin label (on runtimes that report it, as CRI says).
    pub pinned: bool,
    /// Why the image is not in the runtime, or not as wanted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Something to know that is not a failure (a runtime too old to honour pins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Unix time of the check (0: not yet checked).
    pub checked_at: u64,
}

/// The last runtime check of each warm image marked `into_runtime`. Written by the worker only.
#[derive(Debug, Default)]
pub struct Board {
    images: Mutex<BTreeMap<String, InRuntime>>,
}

impl Board {
    /// Every `into_runtime` image's last check, by warm-list image.
    pub fn snapshot(&self) -> BTreeMap<String, InRuntime> {
        self.images.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn get(&self, image: &str) -> Option<InRuntime> {
        self.images.lock().unwrap_or_else(|e| e.into_inner()).get(image).cloned()
    }

    pub(super) fn set(&self, image: &str, status: InRuntime) {
        self.images.lock().unwrap_or_else(|e| e.into_inner()).insert(image.to_owned(), status);
    }
}

/// What one warm pass asks of the runtime for one image.
#[derive(Debug, Clone)]
pub(super) struct Wanted {
    /// The warm-list entry as written.
    pub image: String,
    /// The reference the runtime pulls.
    pub reference: String,
    /// wharf's digest of it after this pass; `None` when the pass failed for the image.
    pub digest: Option<Digest>,
    /// Why the pass failed for the image.
    pub error: Option<String>,
    /// `pin_in_runtime`.
    pub pin: bool,
}

/// The reference the runtime knows an image by, as containerd's CRI normalises it: the registry's name
/// (the host runtimes name it by, and the `ns` they send to their mirror), the repository as the registry
/// knows it (`library/` on Docker Hub), then the tag or digest.
pub(super) fn runtime_reference(registry: &str, repo: &str, reference: &Reference) -> String {
    match reference {
        Reference::Tag(tag) => format!("{registry}/{repo}:{tag}"),
        Reference::Digest(digest) => format!("{registry}/{repo}@{digest}"),
    }
}

/// Starts the worker; the warm list sends each pass's outcome to the returned sender. Only called with a
/// runtime endpoint configured.
pub(super) fn spawn(
    settings: WarmSettings,
    metrics: Arc<Metrics>,
    board: Arc<Board>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> watch::Sender<Vec<Wanted>> {
    let (tx, mut rx) = watch::channel(Vec::new());
    rx.mark_unchanged();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            let wanted = rx.borrow_and_update().clone();
            tokio::select! {
                _ = sync(&settings, &metrics, &board, &wanted) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
    tx
}

/// Brings the runtime to `wanted`: pulls what it lacks, pins and unpins, then removes wharf's pins from
/// images no longer wanted pinned (off the list, or `pin_in_runtime` turned off).
async fn sync(settings: &WarmSettings, metrics: &Metrics, board: &Board, wanted: &[Wanted]) {
    let endpoint = &settings.runtime_endpoint;
    let calls = Duration::from_secs(settings.runtime_timeout);
    let connected = async {
        let runtime = Runtime::connect(endpoint, calls).await?;
        let version = runtime.version().await?;
        Ok::<_, crate::runtime::RuntimeError>((runtime, version))
    };
    let (runtime, version) = match connected.await {
        Ok(connected) => connected,
        Err(e) => {
            let why = chain(&e);
            tracing::warn!(endpoint = %endpoint, error = %why, "container runtime unavailable; retrying after the next warm pass");
            for item in wanted {
                let status = InRuntime { error: Some(why.clone()), ..unchecked(board, item) };
                record(metrics, board, item, status);
            }
            return;
        }
    };
    let pull_within = Duration::from_secs(settings.runtime_pull_timeout);
    for item in wanted {
        let mut status = unchecked(board, item);
        // A step that fails keeps what the steps before it found (the image pulled, say, then the pin failed).
        if let Err(e) = one(&runtime, &version, item, &mut status, pull_within).await {
            let why = chain(&e);
            tracing::warn!(image = %item.image, reference = %item.reference, error = %why, "warm image: runtime step failed");
            status.error = Some(why);
        }
        record(metrics, board, item, status);
    }
    if version.name != "containerd" {
        return;
    }
    let keep: Vec<&str> = wanted.iter().filter(|w| w.pin).map(|w| w.reference.as_str()).collect();
    match runtime.pinned_by_wharf().await {
        Ok(pinned) => {
            for reference in pinned.iter().filter(|r| !keep.contains(&r.as_str())) {
                match runtime.set_pinned(reference, false).await {
                    Ok(_) => {
                        tracing::info!(reference = %reference, "no longer pinned by the warm list: runtime pin removed")
                    }
                    Err(e) => {
                        tracing::warn!(reference = %reference, error = %chain(&e), "removing a runtime pin failed")
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %chain(&e), "listing wharf's runtime pins failed"),
    }
}

/// The status of an item before (or without) a check: the digest it should be at, nothing confirmed.
fn unchecked(board: &Board, item: &Wanted) -> InRuntime {
    let digest = item.digest.clone().or_else(|| board.get(&item.image).and_then(|s| s.digest));
    InRuntime {
        reference: item.reference.clone(),
        digest,
        checked_at: crate::cache::meta::now_secs(),
        ..Default::default()
    }
}

fn record(metrics: &Metrics, board: &Board, item: &Wanted, status: InRuntime) {
    let label = ImageLabel { image: item.image.clone() };
    metrics.warm_in_runtime.get_or_create(&label).set(status.present.into());
    metrics.warm_runtime_pinned.get_or_create(&label).set(status.pinned.into());
    board.set(&item.image, status);
}

/// Pulls one image into the runtime unless it is there at wharf's digest, then sets its pin as wanted,
/// recording in `status` what it finds as it goes.
async fn one(
    runtime: &Runtime,
    version: &RuntimeVersion,
    item: &Wanted,
    status: &mut InRuntime,
    pull_within: Duration,
) -> Result<(), crate::runtime::RuntimeError> {
    // A pass that failed leaves the runtime at the last digest wharf had: report on that one, pull nothing
    // (the runtime would go through wharf to a failing upstream).
    let Some(digest) = status.digest.clone() else {
        status.error = item.error.clone().map(|e| format!("not cached in wharf: {e}"));
        return Ok(());
    };
    let at_digest = |image: &Option<RuntimeImage>| image.as_ref().is_some_and(|i| i.has_digest(&digest.to_string()));
    let mut image = runtime.image(&item.reference).await?;
    if item.digest.is_some() && !at_digest(&image) {
        let started = std::time::Instant::now();
        let id = runtime.pull(&item.reference, pull_within).await?;
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(image = %item.image, reference = %item.reference, %digest, id = %id, ms, "warm image pulled into the runtime");
        image = runtime.image(&item.reference).await?;
    }
    status.present = at_digest(&image);
    if !status.present {
        let has = image.map_or_else(|| "nothing".to_owned(), |i| i.repo_digests.join(", "));
        status.error = Some(match &item.error {
            Some(e) => format!("not cached in wharf: {e}"),
            None => format!("the runtime has {has}, not {digest}"),
        });
    }
    if version.name != "containerd" {
        // The pin label and wharf's mark are containerd's images API; the pulls above are plain CRI.
        if item.pin {
            status.note = Some(format!("{}: pinning needs containerd; not pinned", version.name));
        }
        return Ok(());
    }
    // Set again after every pull: a pull that moves a tag replaces the record and its labels.
    status.pinned = runtime.set_pinned(&item.reference, item.pin).await?;
    if item.pin && version.reports_pinned() && status.pinned {
        status.pinned = runtime.image(&item.reference).await?.is_some_and(|i| i.pinned);
    }
    if item.pin && !version.reports_pinned() {
        status.note = Some(format!(
            "{} {} does not report pinned images to the kubelet (containerd 1.7 and later do): the label is set, \
             but the kubelet's image GC may still remove the image",
            version.name, version.version
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_named_as_the_runtime_names_them() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(
            runtime_reference("docker.io", "library/nginx", &Reference::Tag("1.27".into())),
            "docker.io/library/nginx:1.27"
        );
        assert_eq!(
            runtime_reference("ghcr.io", "org/app", &Reference::Digest(d.clone())),
            format!("ghcr.io/org/app@{d}")
        );
    }
}
