//! Prefetch jobs: `POST /prefetch` starts one and answers at once; the job pulls its images one at a time on
//! the application's task tracker, whether or not anyone asks about it, and `GET /prefetch/{id}` reads its
//! per-image progress.
//!
//! Jobs live in memory: a restart forgets them. At shutdown a running job stops where it is (its image is
//! marked failed); fills it had already started run on like any other fill, within `shutdown_grace`, and a
//! later prefetch fetches only what is still missing.

use crate::oci::Digest;
use crate::state::AppState;
use crate::warm::{self, Plan};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Jobs running at once. One more is refused with `429` (rather than queued): each job already queues its own
/// images, and a client that is told "not now" is easier to reason about than one whose job silently waits.
pub const MAX_RUNNING: usize = 4;
/// Finished jobs kept for `GET /prefetch/{id}`, at most this many (the oldest finished go first).
pub const KEEP_FINISHED: usize = 100;
/// ... and at most this long after they finished.
pub const KEEP_FOR: Duration = Duration::from_secs(3600);
/// Images in one job: with the kept jobs, bounds the memory the job list can take.
pub const MAX_IMAGES: usize = 1000;

/// Where a job, or one of its images, is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for the images before it.
    Queued,
    /// Being pulled.
    Running,
    /// Every manifest and blob was fetched and is cached, but for a blob too large for the cache to hold at all
    /// (streamed to clients from the upstream instead; counted in `wharf_uncached_blobs_total{reason="too_large"}`).
    Done,
    /// Stopped with an error (for a job: at least one image failed, after every image was tried).
    Failed,
}

/// One image of a job.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    /// The image as given.
    pub image: String,
    /// Where it is.
    pub state: State,
    /// What the reference resolved to, once resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Manifests (indexes and platform manifests), once resolved.
    pub manifests: usize,
    /// Configs and layers, once resolved.
    pub blobs: usize,
    /// Blob bytes cached so far (found cached counts too).
    pub bytes_done: u64,
    /// Blob bytes the manifests announce, once resolved.
    pub bytes_total: u64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job as `GET /prefetch/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    /// The job's id (random, so ids from before a restart do not name new jobs).
    pub id: String,
    /// `running` until every image is done or failed; then `done`, or `failed` if any image failed.
    pub state: State,
    /// Platforms asked for (empty: the node's).
    pub platforms: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished: Option<u64>,
    /// Per image, in the order given.
    pub images: Vec<ImageStatus>,
}

struct Entry {
    status: JobStatus,
    /// When it finished (`None`: still running).
    finished_at: Option<Instant>,
}

/// Every job this process knows: running ones, and finished ones within [`KEEP_FINISHED`] and [`KEEP_FOR`].
pub struct Jobs {
    entries: Mutex<HashMap<String, Entry>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// `POST /prefetch` refused: [`MAX_RUNNING`] jobs are running.
#[derive(Debug)]
pub struct Busy;

impl Jobs {
    /// Jobs spawned on `tasks`, stopped when `stop` is cancelled.
    pub fn new(tasks: TaskTracker, stop: CancellationToken) -> Arc<Jobs> {
        Arc::new(Jobs { entries: Mutex::default(), tasks, stop })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves plain data behind; the map is still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a job for `images` and starts it; its status as first seen. Images must already be valid
    /// references (the handler checks them, so bad input is a `400` and no job).
    pub fn start(
        self: &Arc<Self>,
        state: AppState,
        images: Vec<String>,
        platforms: Vec<String>,
    ) -> Result<JobStatus, Busy> {
        let status = self.insert(&images, &platforms, Instant::now())?;
        let (jobs, id) = (self.clone(), status.id.clone());
        tracing::info!(job = %id, images = images.len(), "admin: prefetch job started");
        self.spawn(id.clone(), async move { jobs.run(&state, &id, &images, &platforms).await });
        Ok(status)
    }

    /// Runs job `id`'s `work` on the tracker. However the work ends, the job ends: cut at shutdown, and failed
    /// if it panics (else it would hold one of the [`MAX_RUNNING`] slots until a restart).
    fn spawn(self: &Arc<Self>, id: String, work: impl Future<Output = ()> + Send + 'static) {
        use futures_util::FutureExt;
        let (jobs, stop) = (self.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                ended = std::panic::AssertUnwindSafe(work).catch_unwind() => {
                    if ended.is_err() {
                        tracing::error!(job = %id, "admin: prefetch job panicked");
                        jobs.cut(&id, "the job failed unexpectedly (see the log)");
                    }
                }
                _ = stop.cancelled() => jobs.cut(&id, "stopped by shutdown"),
            }
        });
    }

    /// Adds a running job (all images queued) after dropping expired ones; refused at [`MAX_RUNNING`].
    fn insert(&self, images: &[String], platforms: &[String], now: Instant) -> Result<JobStatus, Busy> {
        let mut entries = self.lock();
        prune(&mut entries, now);
        if entries.values().filter(|e| e.finished_at.is_none()).count() >= MAX_RUNNING {
            return Err(Busy);
        }
        let id = loop {
            let id = format!("{:016x}", rand::random::<u64>());
            if !entries.contains_key(&id) {
                break id;
            }
        };
        let image = |name: &String| ImageStatus {
            image: name.clone(),
            state: State::Queued,
            digest: None,
            manifests: 0,
            blobs: 0,
            bytes_done: 0,
            bytes_total: 0,
            error: None,
        };
        let status = JobStatus {
            id: id.clone(),
            state: State::Running,
            platforms: platforms.to_vec(),
            created: crate::cache::meta::now_secs(),
            finished: None,
            images: images.iter().map(image).collect(),
        };
        entries.insert(id, Entry { status: status.clone(), finished_at: None });
        Ok(status)
    }

    /// The job's status now, if it is known.
    pub fn get(&self, id: &str) -> Option<JobStatus> {
        let mut entries = self.lock();
        prune(&mut entries, Instant::now());
        entries.get(id).map(|e| e.status.clone())
    }

    /// Every known job, oldest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let mut entries = self.lock();
        prune(&mut entries, Instant::now());
        let mut all: Vec<JobStatus> = entries.values().map(|e| e.status.clone()).collect();
        all.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        all
    }

    /// Applies `f` to image `index` of job `id` (gone only if pruned, which a running job never is).
    fn update(&self, id: &str, index: usize, f: impl FnOnce(&mut ImageStatus)) {
        if let Some(image) = self.lock().get_mut(id).and_then(|e| e.status.images.get_mut(index)) {
            f(image);
        }
    }

    /// Marks the job finished now (done, or failed when any image failed).
    fn finish(&self, id: &str, now: Instant) {
        let mut entries = self.lock();
        if let Some(e) = entries.get_mut(id) {
            let failed = e.status.images.iter().any(|i| i.state != State::Done);
            e.status.state = if failed { State::Failed } else { State::Done };
            e.status.finished = Some(crate::cache::meta::now_secs());
            e.finished_at = Some(now);
            tracing::info!(job = %id, state = ?e.status.state, "admin: prefetch job finished");
        }
        prune(&mut entries, now);
    }

    /// Pulls the job's images one at a time, recording each one's progress and outcome.
    async fn run(&self, state: &AppState, id: &str, images: &[String], platforms: &[String]) {
        for (index, image) in images.iter().enumerate() {
            self.update(id, index, |i| i.state = State::Running);
            let progress = ImageProgress { jobs: self, id, index };
            let result = warm::pull(state, image, platforms, false, &progress).await;
            if let Err(e) = &result {
                tracing::warn!(job = %id, %image, error = %e, "admin: prefetch failed");
            }
            self.update(id, index, |i| match result {
                Ok(_) => i.state = State::Done,
                Err(e) => {
                    i.state = State::Failed;
                    i.error = Some(e.to_string());
                }
            });
        }
        self.finish(id, Instant::now());
    }

    /// The job stopped before its end (`why`): whatever had not finished is failed, saying why.
    fn cut(&self, id: &str, why: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            for image in e.status.images.iter_mut().filter(|i| matches!(i.state, State::Queued | State::Running)) {
                image.state = State::Failed;
                image.error = Some(why.into());
            }
        }
        self.finish(id, Instant::now());
    }
}

/// Drops finished jobs older than [`KEEP_FOR`], then the oldest finished ones beyond [`KEEP_FINISHED`].
fn prune(entries: &mut HashMap<String, Entry>, now: Instant) {
    entries.retain(|_, e| e.finished_at.is_none_or(|at| now.saturating_duration_since(at) < KEEP_FOR));
    let mut finished: Vec<(Instant, String)> =
        entries.iter().filter_map(|(id, e)| e.finished_at.map(|at| (at, id.clone()))).collect();
    if finished.len() > KEEP_FINISHED {
        finished.sort();
        for (_, id) in &finished[..finished.len() - KEEP_FINISHED] {
            entries.remove(id);
        }
    }
}

/// One image's hook into the walk: the plan's totals once resolved, then bytes as they are cached.
struct ImageProgress<'a> {
    jobs: &'a Jobs,
    id: &'a str,
    index: usize,
}

impl warm::Progress for ImageProgress<'_> {
    fn resolved(&self, plan: &Plan) {
        self.jobs.update(self.id, self.index, |i| {
            i.digest = Some(plan.digest.clone());
            i.manifests = plan.manifests.len();
            i.blobs = plan.blobs.len();
            i.bytes_total = plan.total_bytes();
        });
    }

    fn advance(&self, n: u64) {
        self.jobs.update(self.id, self.index, |i| i.bytes_done = i.bytes_done.saturating_add(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs() -> Arc<Jobs> {
        Jobs::new(TaskTracker::new(), CancellationToken::new())
    }

    #[test]
    fn running_jobs_are_bounded() {
        let jobs = jobs();
        let now = Instant::now();
        let ids: Vec<String> = (0..MAX_RUNNING).map(|_| jobs.insert(&["a".into()], &[], now).unwrap().id).collect();
        assert!(jobs.insert(&["a".into()], &[], now).is_err(), "a job past MAX_RUNNING was accepted");
        jobs.finish(&ids[0], now);
        assert!(jobs.insert(&["a".into()], &[], now).is_ok(), "a finished job still counted as running");
    }

    #[tokio::test]
    async fn a_job_that_panics_or_is_stopped_ends_failed_and_frees_its_slot() {
        let jobs = jobs();
        let now = Instant::now();
        let ids: Vec<String> =
            (0..MAX_RUNNING).map(|_| jobs.insert(&["a".into(), "b".into()], &[], now).unwrap().id).collect();
        let (j, id) = (jobs.clone(), ids[0].clone());
        jobs.spawn(ids[0].clone(), async move {
            j.update(&id, 0, |i| i.state = State::Done);
            j.update(&id, 1, |i| i.state = State::Running);
            panic!("injected");
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while jobs.get(&ids[0]).unwrap().state == State::Running {
            assert!(Instant::now() < deadline, "the panicked job is still running");
            tokio::time::sleep(Duration::from_millis(10)).await; // poll interval: a panic sends no signal
        }
        jobs.spawn(ids[1].clone(), std::future::pending());
        jobs.stop.cancel();
        jobs.tasks.close();
        tokio::time::timeout(Duration::from_secs(10), jobs.tasks.wait()).await.expect("jobs never ended");
        let panicked = jobs.get(&ids[0]).unwrap();
        assert_eq!(panicked.state, State::Failed);
        assert_eq!((panicked.images[0].state, panicked.images[1].state), (State::Done, State::Failed));
        assert!(panicked.images[1].error.as_deref().is_some_and(|e| e.contains("unexpectedly")), "{panicked:?}");
        let stopped = jobs.get(&ids[1]).unwrap();
        assert_eq!(stopped.images[0].error.as_deref(), Some("stopped by shutdown"));
        assert!(jobs.insert(&["a".into()], &[], now).is_ok(), "an ended job still holds its slot");
    }

    #[test]
    fn finished_jobs_expire_and_are_bounded() {
        let jobs = jobs();
        let start = Instant::now();
        let running = jobs.insert(&["r".into()], &[], start).unwrap().id;
        let mut finished = Vec::new();
        for n in 0..KEEP_FINISHED + 5 {
            let id = jobs.insert(&["a".into()], &[], start).unwrap().id;
            jobs.finish(&id, start + Duration::from_secs(n as u64));
            finished.push(id);
        }
        let known = |id: &String| jobs.lock().contains_key(id);
        assert_eq!(finished.iter().filter(|id| known(id)).count(), KEEP_FINISHED);
        assert!(finished[..5].iter().all(|id| !known(id)), "the oldest finished jobs were not the ones dropped");
        assert!(known(&running));
        // An hour after the last one finished, every finished job is gone; the running one stays.
        let later = start + Duration::from_secs((KEEP_FINISHED + 5) as u64) + KEEP_FOR;
        prune(&mut jobs.lock(), later);
        assert_eq!(jobs.lock().len(), 1);
        assert!(known(&running));
    }
}
