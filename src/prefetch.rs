//! `wharf prefetch IMAGE… [--platform os/arch]…`: pulls images into a cache ahead of time, either through a
//! running wharf (`--server URL`: manifests and blobs are GET through its registry API and discarded while
//! counted, so wharf caches them) or straight into a data directory (`--data-dir DIR`: the cache opened in
//! this process, with the same walk as the warm list). This module owns the command, the HTTP source
//! [`Remote`] and the progress display: a bar per image on a terminal, plain log lines otherwise.

use crate::cli::PrefetchArgs;
use crate::config::Config;
use crate::oci::manifest::Descriptor;
use crate::oci::{AcceptSet, Digest, Reference, Verifier};
use crate::state::AppState;
use crate::warm::{self, Fetch, Plan, Progress};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Images pulled at the same time.
const IMAGE_CONCURRENCY: usize = 3;
/// Without a terminal, at most one progress line per image this often.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Why the command could not run at all (a failing image is reported in [`Summary`] instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The layered configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The data directory or the upstream clients could not be set up.
    #[error("opening the data directory {0}")]
    Open(String, #[source] crate::state::OpenError),
    /// `--server` is not an http(s) URL.
    #[error("--server {0:?} is not an http:// or https:// URL")]
    Server(String),
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// A running wharf holds the data directory.
    #[error("{0} is in use by a running wharf: prefetch through it with --server instead")]
    InUse(String),
    /// A blocking set-up task failed.
    #[error("start-up task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// What the command did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Images fully cached.
    pub ok: usize,
    /// Images that failed, with why.
    pub failed: Vec<(String, String)>,
}

/// Runs the command: sets up logging, pulls every image, reports per image.
pub async fn run(args: &PrefetchArgs) -> Result<Summary, Error> {
    let tty = std::io::stderr().is_terminal();
    init_logging(tty, args.json);
    let display = Display { bars: (tty && !args.json).then(MultiProgress::new) };
    let results: Vec<(String, Result<Plan, warm::Error>)> = match &args.server {
        Some(server) => {
            let base = url::Url::parse(server)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| Error::Server(server.clone()))?;
            let http = reqwest::Client::builder()
                .no_proxy()
                .user_agent(concat!("wharf-prefetch/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(Error::Client)?;
            let base = base.as_str().trim_end_matches('/').to_owned();
            for_each_image(args, &display, |image| {
                let (http, base) = (http.clone(), base.clone());
                async move {
                    let (name, reference) = warm::split_image(image)?;
                    let remote = Remote { http, base, name: name.to_owned() };
                    Ok((remote, reference))
                }
            })
            .await
        }
        None => {
            let config = Config::load(args.config.as_deref(), &args.overrides())?;
            let shown = config.data_dir.display().to_string();
            if in_use(&config.data_dir) {
                return Err(Error::InUse(shown));
            }
            let tasks = tokio_util::task::TaskTracker::new();
            let t = tasks.clone();
            let state = tokio::task::spawn_blocking(move || AppState::open(config, t))
                .await?
                .map_err(|e| Error::Open(shown.clone(), e))?;
            tracing::info!(data_dir = %shown, "prefetching into the data directory");
            let results = for_each_image(args, &display, |image| {
                let state = state.clone();
                async move {
                    let target = warm::target(&state.upstreams, image)?;
                    Ok((Owned { state, target: target.clone() }, target.reference))
                }
            })
            .await;
            tasks.close();
            tasks.wait().await;
            drop(state); // flushes the metadata
            results
        }
    };
    if display.bars.is_some() {
        eprintln!(); // indicatif leaves the cursor at the end of the last bar
    }
    let mut summary = Summary::default();
    for (image, result) in results {
        match result {
            Ok(_) => summary.ok += 1,
            Err(e) => summary.failed.push((image, e.to_string())),
        }
    }
    tracing::info!(ok = summary.ok, failed = summary.failed.len(), "prefetch finished");
    Ok(summary)
}

/// True when another process (a running wharf) holds the metadata database's lock: sled keeps an exclusive
/// `flock` on `meta/db` while open, and opening it anyway must not be attempted.
fn in_use(data_dir: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(data_dir.join("meta").join("db")) else { return false };
    // SAFETY: flock on a descriptor this function owns; the lock goes when `file` is closed on return.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// Text (or JSON) log lines on stderr, without colours unless it is a terminal; on a terminal only warnings,
/// so the bars stay readable.
fn init_logging(tty: bool, json: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if tty && !json { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(tty);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// Pulls every image of `args` (a few at a time) with the source `source(image)` builds.
async fn for_each_image<'a, F, Fut, S>(
    args: &'a PrefetchArgs,
    display: &'a Display,
    source: F,
) -> Vec<(String, Result<Plan, warm::Error>)>
where
    F: Fn(&'a str) -> Fut,
    Fut: Future<Output = Result<(S, Reference), warm::Error>>,
    S: Fetch,
{
    let jobs = args.images.iter().map(|image| {
        let progress = display.image(image);
        let source = source(image);
        async move {
            let result = async {
                let (fetcher, reference) = source.await?;
                let plan = warm::resolve(&fetcher, &reference, &args.platforms).await?;
                progress.resolved(&plan);
                warm::fetch(&fetcher, &plan, &progress).await?;
                Ok(plan)
            }
            .await;
            progress.finish(&result);
            (image.clone(), result)
        }
    });
    futures_util::stream::iter(jobs).buffer_unordered(IMAGE_CONCURRENCY).collect().await
}

/// [`warm::Local`] owning its handles, so a per-image future can hold it.
struct Owned {
    state: AppState,
    target: warm::Target,
}

impl Fetch for Owned {
    async fn manifest(&self, reference: &Reference) -> Result<(Digest, Bytes), warm::Error> {
        warm::Local::new(&self.state.cache, &self.target).manifest(reference).await
    }

    async fn blob(&self, blob: &Descriptor, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, warm::Error> {
        warm::Local::new(&self.state.cache, &self.target).blob(blob, progress).await
    }
}

/// Pulls through a running wharf's registry API with path-prefix routing (`/v2/<name>/…`, where `<name>`
/// keeps its registry prefix), discarding the bytes after counting and verifying them.
pub struct Remote {
    http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// The image name as given (`docker.io/library/nginx`).
    name: String,
}

impl Remote {
    async fn get(&self, tail: &str, accept: Option<String>) -> Result<reqwest::Response, warm::Error> {
        let url = format!("{}/v2/{}/{tail}", self.base, self.name);
        let mut req = self.http.get(&url);
        if let Some(accept) = accept {
            req = req.header(http::header::ACCEPT, accept);
        }
        let resp = req.send().await.map_err(|e| warm::Error::Remote(format!("GET {url}: {}", warm::chain(&e))))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let detail = body["errors"][0]["message"].as_str().or(body["errors"][0]["code"].as_str()).unwrap_or("");
        Err(warm::Error::Remote(format!("GET {url}: {status} {detail}").trim_end().to_owned()))
    }
}

impl Fetch for Remote {
    async fn manifest(&self, reference: &Reference) -> Result<(Digest, Bytes), warm::Error> {
        let resp = self.get(&format!("manifests/{reference}"), Some(AcceptSet::all_manifests().header_value())).await?;
        let header = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok());
        let announced: Option<Digest> = header.and_then(|v| v.parse().ok());
        let bytes = resp.bytes().await.map_err(|e| warm::Error::Remote(warm::chain(&e)))?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => announced,
        };
        match expected {
            Some(d) if d.matches(&bytes) => Ok((d, bytes)),
            Some(d) => Err(warm::Error::Remote(format!("manifest {reference}: bytes do not match {d}"))),
            None => Ok((Digest::sha256_of(&bytes), bytes)),
        }
    }

    async fn blob(&self, blob: &Descriptor, progress: &(dyn Fn(u64) + Sync)) -> Result<u64, warm::Error> {
        let resp = self.get(&format!("blobs/{}", blob.digest), None).await?;
        let mut verifier = Verifier::new(blob.digest.algorithm());
        let mut body = resp.bytes_stream();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| warm::Error::Remote(format!("blob {}: {}", blob.digest, warm::chain(&e))))?;
            verifier.update(&chunk);
            size += chunk.len() as u64;
            progress(chunk.len() as u64);
        }
        let actual = verifier.finish();
        if actual != blob.digest {
            return Err(warm::Error::Remote(format!("blob {}: received bytes hash to {actual}", blob.digest)));
        }
        Ok(size)
    }
}

/// Where progress goes: bars when `bars` is set, log lines otherwise.
struct Display {
    bars: Option<MultiProgress>,
}

impl Display {
    fn image(&self, image: &str) -> ImageProgress {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {msg}").expect("valid template"));
            bar.set_prefix(image.to_owned());
            bar.set_message("resolving");
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let now = Instant::now();
        ImageProgress {
            image: image.to_owned(),
            bar,
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: now,
            logged: Mutex::new(now),
        }
    }
}

/// One image's progress.
struct ImageProgress {
    image: String,
    bar: Option<ProgressBar>,
    done: AtomicU64,
    total: AtomicU64,
    started: Instant,
    logged: Mutex<Instant>,
}

impl Progress for ImageProgress {
    fn resolved(&self, plan: &Plan) {
        let total = plan.total_bytes();
        self.total.store(total, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => {
                let style = "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}";
                bar.set_style(ProgressStyle::with_template(style).expect("valid template").progress_chars("=> "));
                bar.set_length(total);
                bar.set_message(format!("{} blobs", plan.blobs.len()));
            }
            None => tracing::info!(
                image = %self.image,
                digest = %plan.digest,
                manifests = plan.manifests.len(),
                blobs = plan.blobs.len(),
                bytes = total,
                "prefetch: resolved"
            ),
        }
    }

    fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let mut logged = self.logged.lock().unwrap();
        if logged.elapsed() >= LOG_EVERY {
            *logged = Instant::now();
            let total = self.total.load(Ordering::Relaxed);
            tracing::info!(image = %self.image, done, total, rate = %self.rate(done), "prefetch: progress");
        }
    }
}

impl ImageProgress {
    /// Bytes per second so far, human-readable.
    fn rate(&self, done: u64) -> String {
        let per_sec = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        format!("{}/s", indicatif::BinaryBytes(per_sec as u64))
    }

    fn finish(&self, result: &Result<Plan, warm::Error>) {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        match (&self.bar, result) {
            (Some(bar), Ok(_)) => bar.finish_with_message(format!("done in {secs:.1}s")),
            (Some(bar), Err(e)) => {
                bar.set_style(ProgressStyle::with_template("{prefix} {msg}").expect("valid template"));
                bar.abandon_with_message(format!("FAILED: {e}"));
            }
            (None, Ok(plan)) => tracing::info!(
                image = %self.image,
                digest = %plan.digest,
                bytes = done,
                secs = (secs * 10.0).round() / 10.0,
                rate = %self.rate(done),
                "prefetch: done"
            ),
            (None, Err(e)) => tracing::error!(image = %self.image, error = %e, "prefetch: failed"),
        }
    }
}
