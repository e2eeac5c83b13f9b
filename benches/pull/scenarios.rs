//! The scenarios, each producing one report [`Section`]: issue 3's seven (1 cold single pull, 2 warm single
//! pull, 3 cold herd, 4 late joiners, 5 many images, 6 the large layer with 4 clients (cold and warm),
//! 7 manifest requests per second with `ab -k`) and issue 12's cluster tier (8: a herd spread over three
//! clustered nodes against three independent wharfs, the reference proxy and one wharf; a warm blob through
//! a peer against a local warm hit) and issue 13's bucket tier (9: an empty node refilled from an S3 bucket
//! against one refilled from the throttled upstream), and issue 15's idle connections (10: warm pulls with
//! thousands of idle keep-alive connections held open), 11 (a cold fill's CPU against the floor) and 12 (the
//! kubelet's pull: containerd's CRI `PullImage` through wharf against straight from the registry).
//!
//! Every measured run goes through [`Ctx::measured`]: server CPU (`/proc/PID/stat` deltas), sampled peak
//! RSS, and the shim's counters, read after the shim has been quiet for 300 ms so that background fills
//! (the reference proxy's second download) are charged to the run that caused them.

use crate::Opts;
use crate::bucket::{self, S3sFs};
use crate::client::{self, BlobStats, Mode, Node, PullStats};
use crate::cri;
use crate::origin::{ACCEPT_MANIFESTS, Blob, Catalog, GIB, Image, MIB, unique_bytes};
use crate::peers::{PeerKind, Peers, Target};
use crate::procs::{self, RssSampler};
use crate::report::{Measure, Row, RpsRow, Section, Table, WARM_FILL, WARM_LOCAL, WARM_PEER};
use crate::shim::Shim;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Everything a scenario needs.
pub struct Ctx {
    pub opts: Opts,
    pub shim: Shim,
    pub peers: Peers,
    pub catalog: Catalog,
    /// The origin registry's storage root (its blob files, for scenario 11's floor).
    pub origin_root: std::path::PathBuf,
    /// The origin registry itself, `http://127.0.0.1:PORT` (not through the shim; scenario 12).
    pub origin_url: String,
    pub sections: Vec<Section>,
}

type R<T> = Result<T, String>;

impl Ctx {
    /// `wanted` filtered by `--peers`, in `wanted`'s order.
    fn peers_of(&self, wanted: &[PeerKind]) -> Vec<PeerKind> {
        wanted.iter().copied().filter(|p| self.opts.peers.contains(p)).collect()
    }

    /// Per-connection upstream rate in MB/s (0 = unlimited).
    fn set_rate(&self, mbs: u64) {
        self.shim.set_rate(mbs * 1_000_000);
    }

    /// Runs `fut` against `target`, measuring the server and the upstream.
    async fn measured<T>(&self, target: &Target, fut: impl std::future::Future<Output = T>) -> (T, Measure) {
        let sampler = RssSampler::start(target.pids.clone());
        let cpu0 = procs::cpu_seconds_sum(&target.pids);
        let up0 = self.shim.snapshot();
        let t = Instant::now();
        let out = fut.await;
        let elapsed = t.elapsed().as_secs_f64();
        self.shim.wait_idle(Duration::from_millis(300), Duration::from_secs(300)).await;
        let m = Measure {
            elapsed,
            cpu_s: procs::cpu_seconds_sum(&target.pids) - cpu0,
            peak_rss_kib: sampler.finish(),
            up: self.shim.snapshot().since(&up0),
        };
        (out, m)
    }

    /// The images of the single-pull scenarios: `(key, image)`.
    fn pull_images(&self) -> Vec<(&'static str, Image)> {
        let mut v = vec![("app", self.catalog.app.clone()), ("large", self.catalog.large.clone())];
        if let Some(h) = &self.catalog.huge {
            v.push(("huge", h.clone()));
        }
        v
    }

    /// Pulls every image once (unlimited upstream) so that `target` has them cached; for the reference
    /// proxy, waits until its background fills have committed every blob.
    async fn warm_up(&mut self, target: &Target, images: &[Image]) {
        let saved = self.shim.rate();
        self.shim.set_rate(0);
        for img in images {
            let r = pull_all(&target.url, vec![(img.clone(), Mode::Whole)], self.opts.downloads).await;
            if let Some(Err(e)) = r.first() {
                eprintln!("bench: warm-up of {} on {} failed: {e}", img.repo, target.kind.name());
            }
        }
        if target.kind == PeerKind::Proxy {
            let digests: Vec<String> =
                images.iter().flat_map(|i| i.blobs().into_iter().map(|b| b.digest.clone())).collect();
            let refs: Vec<&str> = digests.iter().map(String::as_str).collect();
            let deadline = Instant::now() + Duration::from_secs(600);
            while !self.peers.proxy_has(&refs) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        self.shim.wait_idle(Duration::from_millis(300), Duration::from_secs(300)).await;
        self.shim.set_rate(saved);
    }

    fn push(&mut self, scenario: u32, title: String, rows: Vec<Row>, notes: Vec<String>) {
        self.push_vs(scenario, title, rows, notes, PeerKind::Wharf);
    }

    /// [`Ctx::push`] with the ratio columns relative to `base`.
    fn push_vs(&mut self, scenario: u32, title: String, mut rows: Vec<Row>, notes: Vec<String>, base: PeerKind) {
        // Group rows by case (first appearance), peers in a fixed order within a case.
        let order: Vec<String> = rows.iter().fold(Vec::new(), |mut acc, r| {
            if !acc.contains(&r.case) {
                acc.push(r.case.clone());
            }
            acc
        });
        rows.sort_by_key(|r| (order.iter().position(|c| *c == r.case), r.peer));
        let section = Section { scenario, title, notes, table: Table::Transfer(rows), base };
        println!("{}", crate::report::render_section(&section));
        self.sections.push(section);
    }
}

/// "410 MiB", "1.0 GiB".
pub fn size_label(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB as f64)
    }
}

fn image_label(img: &Image) -> String {
    let layers: u64 = img.layers.iter().map(|l| l.size).sum();
    format!("{} ({} layers, {})", img.repo, img.layers.len(), size_label(layers))
}

/// One node per job, all started at once; each pulls its image.
async fn pull_all(url: &str, jobs: Vec<(Image, Mode)>, downloads: usize) -> Vec<R<PullStats>> {
    pull_spread(&[url.to_string()], jobs, downloads).await
}

/// [`pull_all`] with job `i` pulling from `urls[i % urls.len()]` (a herd spread over a cluster's nodes).
async fn pull_spread(urls: &[String], jobs: Vec<(Image, Mode)>, downloads: usize) -> Vec<R<PullStats>> {
    let handles: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (img, mode))| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(async move {
                let node = Node::new(downloads);
                client::pull(&node, &url, &img, mode).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap_or_else(|e| Err(format!("client task: {e}"))));
    }
    out
}

/// What a row needs besides the results.
struct RowSpec {
    scenario: u32,
    case: String,
    image: &'static str,
    mode: String,
    peer: PeerKind,
    reference_bytes: u64,
}

fn pull_row(spec: RowSpec, results: &[R<PullStats>], m: Measure) -> Row {
    let mut row = Row {
        scenario: spec.scenario,
        case: spec.case,
        image: spec.image,
        mode: spec.mode,
        peer: spec.peer,
        clients: results.len(),
        errors: Vec::new(),
        wall: Vec::new(),
        ttfb: Vec::new(),
        bytes: 0,
        reference_bytes: spec.reference_bytes,
        m,
        note: String::new(),
    };
    for r in results {
        match r {
            Ok(s) => {
                row.wall.push(s.wall.as_secs_f64());
                row.ttfb.push(s.ttfb.as_secs_f64() * 1e3);
                row.bytes += s.bytes;
            }
            Err(e) => row.errors.push(e.clone()),
        }
    }
    progress(&row);
    row
}

/// One line per finished run on stderr, for watching long runs.
fn progress(r: &Row) {
    let wall = r.wall.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "bench: [{}] {} | {}: max wall {:.2} s, {:.0} MB/s, upstream {:.1} MB ({:.2}×), CPU {:.2} s, RSS {:.0} MB{}",
        r.scenario,
        r.case,
        r.peer.name(),
        wall,
        r.mbps(),
        r.m.up.bytes as f64 / 1e6,
        r.dedupe(),
        r.m.cpu_s,
        r.m.peak_rss_kib as f64 * 1024.0 / 1e6,
        if r.errors.is_empty() { String::new() } else { format!(", {} errors: {}", r.errors.len(), r.errors[0]) }
    );
}

/// 1. One client pulls each image from a cold peer, per rate and client mode.
pub async fn cold_single(ctx: &mut Ctx) {
    let mut rows = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        for (key, img) in ctx.pull_images() {
            for mode in ctx.opts.cold_modes.clone() {
                let case = format!("{}, {}, {rate} MB/s", image_label(&img), mode.name());
                for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Direct]) {
                    let target = ctx.peers.cold(peer).await;
                    let job = pull_all(&target.url, vec![(img.clone(), mode)], ctx.opts.downloads);
                    let (res, m) = ctx.measured(&target, job).await;
                    let spec = RowSpec {
                        scenario: 1,
                        case: case.clone(),
                        image: key,
                        mode: mode.name(),
                        peer,
                        reference_bytes: img.bytes(),
                    };
                    let mut row = pull_row(spec, &res, m);
                    if peer == PeerKind::Wharf {
                        // The adaptive fill's ramp, one per ranged blob: requests in flight @ milliseconds.
                        let ramps = ctx.peers.wharf_ramps();
                        if !ramps.is_empty() {
                            row.note = format!("connections over time: {}", ramps.join(" | "));
                        }
                    }
                    rows.push(row);
                }
            }
        }
    }
    let title = format!(
        "1. Cold single pull (1 client, {} concurrent requests; upstream limited per connection, +{} ms)",
        ctx.opts.downloads, ctx.opts.latency_ms
    );
    ctx.push(1, title, rows, vec![]);
}

/// 2. One client pulls each image from a warm peer, per client mode; peers interleaved run by run.
pub async fn warm_single(ctx: &mut Ctx) {
    let rate = ctx.opts.rates[0];
    let images = ctx.pull_images();
    let plain: Vec<Image> = images.iter().map(|i| i.1.clone()).collect();
    let mut targets = Vec::new();
    for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Nginx]) {
        let target = ctx.peers.cold(peer).await;
        ctx.warm_up(&target, &plain).await;
        targets.push(target);
    }
    ctx.set_rate(rate);
    let mut rows = Vec::new();
    for (key, img) in &images {
        for mode in ctx.opts.warm_modes.clone() {
            let case = format!("{}, {}", image_label(img), mode.name());
            let jobs = vec![(img.clone(), mode)];
            rows.extend(interleaved(ctx, &targets, 2, &case, key, mode, &jobs).await);
        }
    }
    let notes = vec![format!(
        "Warm: every blob cached (the proxy's background fills committed). The manifest is fetched by tag, so \
         the reference proxy still asks the upstream ({rate} MB/s, +{} ms) on every pull. Each figure is the \
         median run (by MB/s) of {} runs, the peers taking turns.",
        ctx.opts.latency_ms, ctx.opts.repeat
    )];
    ctx.push(2, "2. Warm single pull (1 client)".into(), rows, notes);
}

/// Runs `jobs` against every target in turn, `--repeat` times; one row per target: its median run by MB/s.
async fn interleaved(
    ctx: &Ctx,
    targets: &[Target],
    scenario: u32,
    case: &str,
    image: &'static str,
    mode: Mode,
    jobs: &[(Image, Mode)],
) -> Vec<Row> {
    let mut runs: Vec<Vec<Row>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..ctx.opts.repeat {
        for (i, target) in targets.iter().enumerate() {
            let job = pull_all(&target.url, jobs.to_vec(), ctx.opts.downloads);
            let (res, m) = ctx.measured(target, job).await;
            let spec = RowSpec {
                scenario,
                case: case.to_string(),
                image,
                mode: mode.name(),
                peer: target.kind,
                reference_bytes: 0,
            };
            runs[i].push(pull_row(spec, &res, m));
        }
    }
    runs.into_iter().filter_map(median_row).collect()
}

/// The median run by throughput, noting every run's MB/s.
fn median_row(runs: Vec<Row>) -> Option<Row> {
    median_run(runs.into_iter().map(|r| (r, ())).collect()).map(|(r, ())| r)
}

/// [`median_row`] for runs carrying figures of their own (`T`), kept with the run chosen.
fn median_run<T>(mut runs: Vec<(Row, T)>) -> Option<(Row, T)> {
    if runs.len() <= 1 {
        return runs.pop();
    }
    runs.sort_by(|a, b| a.0.mbps().total_cmp(&b.0.mbps()));
    let all: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.0.mbps())).collect();
    let (mut row, extra) = runs.remove(runs.len() / 2);
    let median = format!("median of {} runs, MB/s {}", all.len(), all.join(" / "));
    row.note = if row.note.is_empty() { median } else { format!("{median}; this run: {}", row.note) };
    Some((row, extra))
}

/// 3. N clients pull the same image from a cold peer at once.
pub async fn cold_herd(ctx: &mut Ctx) {
    let img = ctx.catalog.app.clone();
    let mut rows = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        for n in ctx.opts.herd.clone() {
            let case = format!("N = {n}, {rate} MB/s");
            for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Direct]) {
                let target = ctx.peers.cold(peer).await;
                let jobs = vec![(img.clone(), Mode::Whole); n];
                let (res, m) = ctx.measured(&target, pull_all(&target.url, jobs, ctx.opts.downloads)).await;
                let spec = RowSpec {
                    scenario: 3,
                    case: case.clone(),
                    image: "app",
                    mode: "whole".into(),
                    peer,
                    reference_bytes: img.bytes(),
                };
                rows.push(pull_row(spec, &res, m));
            }
        }
    }
    let title = format!("3. Cold herd: N clients pull {} at once (whole-blob GETs)", image_label(&img));
    let notes = vec!["dedupe = upstream bytes / image bytes (1.00: every byte fetched once).".into()];
    ctx.push(3, title, rows, notes);
}

/// 4. A leader pulls the large layer from a cold peer; joiners start when it has 25/50/75 %.
pub async fn late_joiners(ctx: &mut Ctx) {
    let img = ctx.catalog.large.clone();
    let blob = img.layers[0].clone();
    let mut rows = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        let case = format!("{} layer, {rate} MB/s", size_label(blob.size));
        for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Direct]) {
            let target = ctx.peers.cold(peer).await;
            let job = joiners(&target.url, &img.repo, &blob, &[0.25, 0.5, 0.75]);
            let ((leader, joined), m) = ctx.measured(&target, job).await;
            let mut row = Row {
                scenario: 4,
                case: case.clone(),
                image: "large",
                mode: "whole".into(),
                peer,
                clients: 1 + joined.len(),
                errors: Vec::new(),
                wall: Vec::new(),
                ttfb: Vec::new(),
                bytes: 0,
                reference_bytes: blob.size,
                m,
                note: String::new(),
            };
            let mut notes = Vec::new();
            match leader {
                Ok((s, wall)) => {
                    row.bytes += s.bytes;
                    notes.push(format!("leader {wall:.2} s"));
                }
                Err(e) => row.errors.push(format!("leader: {e}")),
            }
            for j in joined {
                match j.result {
                    Ok((s, wall)) => {
                        row.bytes += s.bytes;
                        row.wall.push(wall);
                        row.ttfb.push(s.ttfb.as_secs_f64() * 1e3);
                        notes.push(format!(
                            "joiner at {:.0}%{}: TTFB {:.1} ms, {wall:.2} s",
                            j.fraction * 100.0,
                            if j.fill_running { "" } else { " (leader already done)" },
                            s.ttfb.as_secs_f64() * 1e3
                        ));
                    }
                    Err(e) => row.errors.push(format!("joiner at {:.0}%: {e}", j.fraction * 100.0)),
                }
            }
            row.note = notes.join(", ");
            progress(&row);
            rows.push(row);
        }
    }
    let notes = vec![
        "Joiners start when the leader has received 25/50/75 % of the blob; wall and TTFB columns are the \
         joiners'. A whole-blob GET each."
            .into(),
    ];
    ctx.push(4, "4. Late joiners during a cold fill".into(), rows, notes);
}

struct Joined {
    fraction: f64,
    fill_running: bool,
    result: R<(BlobStats, f64)>,
}

type Timed = R<(BlobStats, f64)>;

async fn joiners(url: &str, repo: &str, blob: &Blob, fractions: &[f64]) -> (Timed, Vec<Joined>) {
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let fetch = |progress: Option<Arc<AtomicU64>>| {
        let (url, repo, blob) = (url.to_string(), repo.to_string(), blob.clone());
        async move {
            let node = Node::new(1);
            let t = Instant::now();
            let r = client::fetch_blob(&node, &url, &repo, &blob, Mode::Whole, progress.as_deref()).await;
            r.map(|s| (s, t.elapsed().as_secs_f64()))
        }
    };
    let leader = {
        let (f, done) = (fetch(Some(progress.clone())), done.clone());
        tokio::spawn(async move {
            let r = f.await;
            done.store(true, Ordering::Relaxed);
            r
        })
    };
    let mut handles = Vec::new();
    for &f in fractions {
        let want = (blob.size as f64 * f) as u64;
        // Bounded wait: at most one hour at 1 ms steps.
        for _ in 0..3_600_000 {
            if progress.load(Ordering::Relaxed) >= want || done.load(Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let running = !done.load(Ordering::Relaxed);
        handles.push((f, running, tokio::spawn(fetch(None))));
    }
    let leader = leader.await.unwrap_or_else(|e| Err(format!("leader task: {e}")));
    let mut joined = Vec::new();
    for (fraction, fill_running, h) in handles {
        let result = h.await.unwrap_or_else(|e| Err(format!("joiner task: {e}")));
        joined.push(Joined { fraction, fill_running, result });
    }
    (leader, joined)
}

/// 5. Many clients pull many small images (shared base layers) from a cold peer.
pub async fn many_images(ctx: &mut Ctx) {
    let images = ctx.catalog.many.clone();
    let reference = unique_bytes(&images.iter().collect::<Vec<_>>());
    let clients = ctx.opts.many_clients;
    let mut order: Vec<Image> = (0..ctx.opts.many_pulls).flat_map(|_| images.iter().cloned()).collect();
    order.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(5));
    let mut rows = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        let case = format!("{} pulls by {clients} clients, {rate} MB/s", order.len());
        for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Direct]) {
            let target = ctx.peers.cold(peer).await;
            let queue = Arc::new(Mutex::new(order.iter().cloned().collect::<VecDeque<_>>()));
            let job = async {
                let workers: Vec<_> = (0..clients)
                    .map(|_| {
                        let (queue, url, downloads) = (queue.clone(), target.url.clone(), ctx.opts.downloads);
                        tokio::spawn(async move {
                            let node = Node::new(downloads);
                            let mut out = Vec::new();
                            loop {
                                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                                let Some(img) = next else { break };
                                out.push(client::pull(&node, &url, &img, Mode::Whole).await);
                            }
                            out
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for w in workers {
                    match w.await {
                        Ok(v) => all.extend(v),
                        Err(e) => all.push(Err(format!("client task: {e}"))),
                    }
                }
                all
            };
            let (res, m) = ctx.measured(&target, job).await;
            let spec = RowSpec {
                scenario: 5,
                case: case.clone(),
                image: "many",
                mode: "whole".into(),
                peer,
                reference_bytes: reference,
            };
            let mut row = pull_row(spec, &res, m);
            row.clients = clients;
            rows.push(row);
        }
    }
    let title = format!(
        "5. Many images: {} repositories × 5 layers (2 shared by all, 1 per group of 10, 2 own), {clients} \
         concurrent clients",
        images.len()
    );
    let notes = vec![format!(
        "Wall and TTFB are per image pull. dedupe = upstream bytes / unique bytes of all images ({}).",
        size_label(reference)
    )];
    ctx.push(5, title, rows, notes);
}

/// 6. The large layer with several clients, cold then warm.
pub async fn large_layer(ctx: &mut Ctx) {
    let n = ctx.opts.large_clients;
    let mut images = vec![("large", ctx.catalog.large.clone())];
    if let Some(h) = &ctx.catalog.huge {
        images.push(("huge", h.clone()));
    }
    let mut rows = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        for (key, img) in &images {
            let case = format!("cold, {}, {rate} MB/s", image_label(img));
            for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Direct]) {
                let target = ctx.peers.cold(peer).await;
                let jobs = vec![(img.clone(), Mode::Whole); n];
                let (res, m) = ctx.measured(&target, pull_all(&target.url, jobs, ctx.opts.downloads)).await;
                let spec = RowSpec {
                    scenario: 6,
                    case: case.clone(),
                    image: key,
                    mode: "whole".into(),
                    peer,
                    reference_bytes: img.bytes(),
                };
                rows.push(pull_row(spec, &res, m));
            }
        }
    }
    let rate = ctx.opts.rates[0];
    let plain: Vec<Image> = images.iter().map(|i| i.1.clone()).collect();
    let mut targets = Vec::new();
    for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Proxy, PeerKind::Nginx]) {
        let target = ctx.peers.current(peer).await;
        ctx.warm_up(&target, &plain).await;
        targets.push(target);
    }
    ctx.set_rate(rate);
    for (key, img) in &images {
        for mode in [Mode::Whole, Mode::Chunked(ctx.opts.chunk, ctx.opts.par)] {
            let case = format!("warm, {}, {}", image_label(img), mode.name());
            let jobs = vec![(img.clone(), mode); n];
            rows.extend(interleaved(ctx, &targets, 6, &case, key, mode, &jobs).await);
        }
    }
    let title = format!("6. The large layer, {n} clients at once, cold then warm");
    let notes = vec![format!(
        "Peak RSS is sampled every 20 ms over the run (nginx: master + workers). Compare it with the smaller \
             images of scenarios 1–3: memory must not grow with blob size. Warm figures: median of {} runs, the \
             peers taking turns.",
        ctx.opts.repeat
    )];
    ctx.push(6, title, rows, notes);
}

/// 7. Manifest `HEAD`/`GET` by tag and by digest with `ab -k`.
pub async fn manifests(ctx: &mut Ctx) {
    let img = ctx.catalog.app.clone();
    ctx.set_rate(ctx.opts.rates[0]);
    let mut rows = Vec::new();
    let kinds = [
        ("HEAD tag", img.tag.clone(), true),
        ("GET tag", img.tag.clone(), false),
        ("HEAD digest", img.manifest_digest.clone(), true),
        ("GET digest", img.manifest_digest.clone(), false),
    ];
    let mut targets = Vec::new();
    for peer in ctx.peers_of(&[PeerKind::Wharf, PeerKind::Nginx, PeerKind::Proxy, PeerKind::Direct]) {
        targets.push(ctx.peers.current(peer).await);
    }
    for (what, reference, head) in &kinds {
        // Peers take turns run by run, so that a noisy moment does not hit one peer only.
        let mut best: Vec<Option<RpsRow>> = targets.iter().map(|_| None).collect();
        for _ in 0..ctx.opts.ab_runs {
            for (i, target) in targets.iter().enumerate() {
                let url = format!("{}/v2/{}/manifests/{reference}", target.url, img.repo);
                let row = ab_row(ctx, target, &url, what, *head).await;
                if best[i].as_ref().is_none_or(|b| row.rps > b.rps) {
                    best[i] = Some(row);
                }
            }
        }
        for row in best.into_iter().flatten() {
            eprintln!(
                "bench: [7] {what} | {}: {:.0} req/s, {} upstream requests {}",
                row.peer.map(|p| p.name()).unwrap_or("?"),
                row.rps,
                row.up.total_requests(),
                row.note
            );
            rows.push(row);
        }
    }
    let section = Section {
        scenario: 7,
        title: format!(
            "7. Manifest requests per second (HEAD: `ab -i -k -c {0} -t {1}`, GET: `wrk -t2 -c {0} -d {1}s`; best \
             of {2}; {3} of {4} bytes; nginx serves the same bytes as a static file)",
            ctx.opts.ab_concurrency,
            ctx.opts.ab_secs,
            ctx.opts.ab_runs,
            img.repo,
            img.manifest.len()
        ),
        notes: vec![
            "ab (one thread) and wrk (two) share the 2 cores with the server. The reference proxy and direct go \
             upstream (via the shim, +20 ms) for every tag request."
                .into(),
        ],
        table: Table::Rps(rows),
        base: PeerKind::Wharf,
    };
    println!("{}", crate::report::render_section(&section));
    ctx.sections.push(section);
}

/// One warm-up GET, then one measured `ab` run against `url`.
async fn ab_row(ctx: &Ctx, target: &Target, url: &str, what: &str, head: bool) -> RpsRow {
    // Warm-up: the tag is now fresh (well within wharf's default 60 s tag_ttl) and the manifest cached.
    let warm = reqwest::Client::builder().no_proxy().build().expect("client");
    let ok = matches!(
        warm.get(url).header("accept", ACCEPT_MANIFESTS).send().await,
        Ok(r) if r.status().is_success()
    );
    // HEAD with `ab -i -k`; GET with wrk (two threads: ab's one thread is the bottleneck for small GETs).
    let load = async {
        if head {
            ab(url, true, ctx.opts.ab_secs, ctx.opts.ab_concurrency).await
        } else {
            wrk(url, ctx.opts.ab_secs, ctx.opts.ab_concurrency).await
        }
    };
    let (ab, m) = ctx.measured(target, load).await;
    let mut row = RpsRow {
        what: what.to_string(),
        peer: Some(target.kind),
        cpu_s: m.cpu_s,
        peak_rss_kib: m.peak_rss_kib,
        up: m.up,
        ..Default::default()
    };
    match ab {
        Ok(a) => {
            row.rps = a.rps;
            row.complete = a.complete;
            row.failed = a.failed;
            row.non_2xx = a.non_2xx;
            row.keep_alive = a.keep_alive;
        }
        Err(e) => row.note = format!("load generator failed: {e}"),
    }
    if !ok {
        row.note.push_str(" (warm-up GET failed)");
    }
    row
}

struct AbResult {
    rps: f64,
    complete: u64,
    failed: u64,
    non_2xx: u64,
    keep_alive: u64,
}

async fn ab(url: &str, head: bool, secs: u64, concurrency: usize) -> R<AbResult> {
    let mut cmd = std::process::Command::new("ab");
    cmd.arg("-k")
        .arg("-q")
        .arg("-c")
        .arg(concurrency.to_string())
        .arg("-t")
        .arg(secs.to_string())
        .arg("-n")
        .arg("50000000")
        .arg("-H")
        .arg(format!("Accept: {ACCEPT_MANIFESTS}"));
    if head {
        cmd.arg("-i");
    }
    cmd.arg(url);
    let timeout = Duration::from_secs(secs + 60);
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || procs::run_output(cmd, timeout)).await.map_err(|e| e.to_string())?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let Some(rps) = field("Requests per second:") else {
        return Err(format!("ab (ok={ok}): {}", err.lines().last().unwrap_or("no output")));
    };
    Ok(AbResult {
        rps,
        complete: field("Complete requests:").unwrap_or(0.0) as u64,
        failed: field("Failed requests:").unwrap_or(0.0) as u64,
        non_2xx: field("Non-2xx responses:").unwrap_or(0.0) as u64,
        keep_alive: field("Keep-Alive requests:").unwrap_or(0.0) as u64,
    })
}

/// `wrk -t2 -c CONCURRENCY -d SECS` GETs of `url` (keep-alive, as wrk always is).
async fn wrk(url: &str, secs: u64, concurrency: usize) -> R<AbResult> {
    let mut cmd = std::process::Command::new("wrk");
    cmd.args(["-t2", "-c", &concurrency.max(2).to_string(), "-d", &format!("{secs}s")])
        .arg("-H")
        .arg(format!("Accept: {ACCEPT_MANIFESTS}"))
        .arg(url);
    let timeout = Duration::from_secs(secs + 60);
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || procs::run_output(cmd, timeout)).await.map_err(|e| e.to_string())?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let Some(rps) = field("Requests/sec:") else {
        return Err(format!("wrk (ok={ok}): {}", err.lines().last().unwrap_or("no output")));
    };
    // "N requests in Xs, Y MB read"
    let complete = out.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.parse::<f64>().ok());
    let errors = out
        .lines()
        .find(|l| l.contains("Socket errors:"))
        .map_or(0, |l| l.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum());
    Ok(AbResult {
        rps,
        complete: complete.unwrap_or(0.0) as u64,
        failed: errors,
        non_2xx: field("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64,
        keep_alive: complete.unwrap_or(0.0) as u64,
    })
}

/// Sum of the `/metrics` samples of every URL whose series starts with `prefix` (name, or name and labels).
async fn metric_sum(urls: &[String], prefix: &str) -> f64 {
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let mut sum = 0.0;
    for url in urls {
        let Ok(r) = http.get(format!("{url}/metrics")).send().await else { continue };
        let text = r.text().await.unwrap_or_default();
        sum += text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

const PEER_BYTES_IN: &str = "wharf_peer_bytes_total{direction=\"in\"}";
const PEER_FALLBACKS: &str = "wharf_peer_fallbacks_total";

/// One client GETs one blob from `url`, timed like a pull.
async fn one_blob(url: &str, repo: &str, blob: &Blob) -> R<PullStats> {
    let node = Node::new(1);
    let t = Instant::now();
    let s = client::fetch_blob(&node, url, repo, blob, Mode::Whole, None).await?;
    Ok(PullStats { wall: t.elapsed(), ttfb: s.ttfb, bytes: s.bytes, requests: s.requests })
}

/// Scenario 8, the cluster tier (issue 12). A cold herd spread over three clustered nodes (client `i` on
/// node `i mod 3`), then the same herd over three independent wharfs, the reference proxy and one wharf,
/// each cold; then a warm blob: GETs through its owner (a local hit) and through a node that has never had
/// it (it streams the blob from the owner and caches it), taking turns.
pub async fn cluster(ctx: &mut Ctx) {
    let img = ctx.catalog.app.clone();
    let n = ctx.opts.cluster_clients;
    let mut rows = Vec::new();
    let peers = ctx.peers_of(&[PeerKind::Cluster, PeerKind::Independent, PeerKind::Proxy, PeerKind::Wharf]);
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        let case = format!("herd of {n}, {rate} MB/s");
        let mut runs: Vec<Vec<Row>> = peers.iter().map(|_| Vec::new()).collect();
        for round in 0..ctx.opts.repeat {
            for (i, &peer) in peers.iter().enumerate() {
                // The proxy's figures enter no target and its cold herd is the slowest case: once.
                if peer == PeerKind::Proxy && round > 0 {
                    continue;
                }
                runs[i].push(herd_run(ctx, peer, &case, &img, n).await);
            }
        }
        rows.extend(runs.into_iter().filter_map(median_row));
    }
    if ctx.opts.peers.contains(&PeerKind::Cluster) {
        rows.extend(warm_through_peer(ctx).await);
    }
    let large = size_label(ctx.catalog.large.layers[0].size);
    let title = format!(
        "8. Cluster: a herd of {n} spread over three nodes, and a warm blob through a peer ({})",
        image_label(&img)
    );
    let notes = vec![
        "Herd: client i pulls from node i mod 3 (cluster, 3 wharfs), or all from the one server (proxy, \
         wharf); each case starts cold. dedupe = upstream bytes / image bytes: the cluster and one wharf \
         should fetch every byte once, three independent wharfs three times. Completion is the slowest \
         client's wall time (the max column); the target is cluster ≤ 1.25× one wharf. Each figure is the \
         median run by MB/s of the --repeat cold runs, the peers taking turns; the proxy runs once. Peak RSS \
         and CPU of the cluster and of the 3 wharfs are sums over the three nodes."
            .into(),
        format!(
            "Warm: the {large} layer, one client, whole GETs. A cold cluster first fetches it through its \
             owner (the node that ranks first for its digest) with the upstream unthrottled (row \"cold\": what \
             one fill costs here); then GETs through the owner (a local warm hit) and through another node that \
             has never had it (which streams it from the owner, verifies and caches it) take turns. Each of the \
             two other nodes is the edge once; a new cold cluster is started for more runs. Each figure is the \
             median run by MB/s of {}; the target is edge ≥ 0.8× local. CPU counts all three nodes (the \
             details give each node's).",
            ctx.opts.repeat
        ),
    ];
    ctx.push_vs(8, title, rows, notes, PeerKind::Cluster);
}

/// One cold herd of `n` against `peer`, spread over its nodes.
async fn herd_run(ctx: &mut Ctx, peer: PeerKind, case: &str, img: &Image, n: usize) -> Row {
    let target = ctx.peers.cold(peer).await;
    let jobs = vec![(img.clone(), Mode::Whole); n];
    let (peer_in, fallbacks) =
        (metric_sum(&target.urls, PEER_BYTES_IN).await, metric_sum(&target.urls, PEER_FALLBACKS).await);
    let (res, m) = ctx.measured(&target, pull_spread(&target.urls, jobs, ctx.opts.downloads)).await;
    let spec = RowSpec {
        scenario: 8,
        case: case.to_string(),
        image: "app",
        mode: "whole".into(),
        peer,
        reference_bytes: img.bytes(),
    };
    let mut row = pull_row(spec, &res, m);
    row.note = format!("{} node(s), {} clients each", target.urls.len(), n.div_ceil(target.urls.len()));
    if peer == PeerKind::Cluster {
        let peer_in = metric_sum(&target.urls, PEER_BYTES_IN).await - peer_in;
        let fallbacks = metric_sum(&target.urls, PEER_FALLBACKS).await - fallbacks;
        row.note.push_str(&format!(
            "; peer bytes in {:.0} MB ({:.2}× the image), peer fallbacks {fallbacks:.0}",
            peer_in / 1e6,
            peer_in / img.bytes() as f64
        ));
    }
    if !row.errors.is_empty() {
        eprintln!("bench: [8] errors; wharf logs:\n{}", ctx.peers.wharf_logs(40));
    }
    row
}

/// Scenario 8's warm part: `--repeat` runs of a local warm hit on the owner and of a GET through a node
/// that has never had the blob; one median row of each.
async fn warm_through_peer(ctx: &mut Ctx) -> Vec<Row> {
    let img = ctx.catalog.large.clone();
    let blob = img.layers[0].clone();
    let case = format!("warm {} blob, 1 client", size_label(blob.size));
    let (mut local, mut via_peer, mut fills) = (Vec::new(), Vec::new(), Vec::new());
    while via_peer.len() < ctx.opts.repeat {
        let target = ctx.peers.cold(PeerKind::Cluster).await;
        let ranked = wharf::cluster::hrw::rank(target.peer_addrs.iter().map(String::as_str), &blob.digest);
        let index = |addr: &str| target.peer_addrs.iter().position(|p| p == addr).expect("a node");
        let owner = index(ranked[0]);
        let edges: Vec<usize> = ranked[1..].iter().map(|p| index(p)).collect();
        // The owner fills from the upstream itself (no peer ranks above it), unthrottled: a reference for
        // what one fill (hash, write, serve) costs on this machine.
        let saved = ctx.shim.rate();
        ctx.shim.set_rate(0);
        let (res, m) = ctx.measured(&target, one_blob(&target.urls[owner], &img.repo, &blob)).await;
        if let Err(e) = &res {
            eprintln!("bench: [8] warming the owner failed: {e}\n{}", ctx.peers.wharf_logs(40));
        }
        let spec = RowSpec {
            scenario: 8,
            case: format!("{case}, its owner, cold (upstream unthrottled)"),
            image: "large",
            mode: WARM_FILL.into(),
            peer: PeerKind::Cluster,
            reference_bytes: blob.size,
        };
        fills.push(pull_row(spec, &[res], m));
        ctx.shim.set_rate(saved);
        for edge in edges {
            if via_peer.len() >= ctx.opts.repeat {
                break;
            }
            for (mode, node, runs) in [(WARM_LOCAL, owner, &mut local), (WARM_PEER, edge, &mut via_peer)] {
                let url = target.urls[node].clone();
                let before = metric_sum(std::slice::from_ref(&url), PEER_BYTES_IN).await;
                let cpu0: Vec<f64> = target.pids.iter().map(|&p| procs::cpu_seconds(p)).collect();
                let (res, m) = ctx.measured(&target, one_blob(&url, &img.repo, &blob)).await;
                let cpu: Vec<String> = target
                    .pids
                    .iter()
                    .zip(&cpu0)
                    .map(|(&p, c0)| format!("{:.2}", procs::cpu_seconds(p) - c0))
                    .collect();
                let spec = RowSpec {
                    scenario: 8,
                    case: format!("{case}, {}", if mode == WARM_LOCAL { "its owner" } else { "another node" }),
                    image: "large",
                    mode: mode.into(),
                    peer: PeerKind::Cluster,
                    reference_bytes: 0,
                };
                let mut row = pull_row(spec, &[res], m);
                let peer_in = metric_sum(std::slice::from_ref(&url), PEER_BYTES_IN).await - before;
                row.note = format!(
                    "node {node} (owner: node {owner}), peer bytes in {:.0} MB, CPU-s by node {}",
                    peer_in / 1e6,
                    cpu.join(" / ")
                );
                runs.push(row);
            }
        }
    }
    [median_row(fills), median_row(local), median_row(via_peer)].into_iter().flatten().collect()
}

const BUCKET_READ: &str = "wharf_bucket_bytes_total{reason=\"read\"}";
const BUCKET_WRITTEN: &str = "wharf_bucket_bytes_total{reason=\"written\"}";
/// Bucket lookups by result, `{reason="…"}` appended.
const BUCKET_REQUESTS: &str = "wharf_bucket_requests_total";

/// Bucket figures of one scenario-9 run, from the serving wharf's `/metrics`.
#[derive(Clone, Copy)]
struct BucketUse {
    read: f64,
    written: f64,
    hits: f64,
    misses: f64,
    errors: f64,
}

impl BucketUse {
    async fn of(url: &str) -> BucketUse {
        let urls = [url.to_string()];
        let requests = |reason: &str| format!("{BUCKET_REQUESTS}{{reason=\"{reason}\"}}");
        BucketUse {
            read: metric_sum(&urls, BUCKET_READ).await,
            written: metric_sum(&urls, BUCKET_WRITTEN).await,
            hits: metric_sum(&urls, &requests("hit")).await,
            misses: metric_sum(&urls, &requests("miss")).await,
            errors: metric_sum(&urls, &requests("error")).await,
        }
    }

    fn since(self, before: BucketUse) -> BucketUse {
        BucketUse {
            read: self.read - before.read,
            written: self.written - before.written,
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            errors: self.errors - before.errors,
        }
    }
}

/// Scenario 9, the bucket tier (issue 13). s3s-fs (a file-backed S3 server) gets one bucket; a wharf with that
/// bucket pulls the image(s) so that every blob is uploaded; then, taking turns `--repeat` times per rate,
/// a new wharf on an empty disk with the bucket (it should read every blob from the bucket, none from the
/// upstream) and a new wharf on an empty disk without it (every blob through the throttled shim) serve
/// one client each. Only wharf's config file and `/metrics` and the bucket's object files are used.
pub async fn refill(ctx: &mut Ctx) {
    let mut images = vec![("app", ctx.catalog.app.clone())];
    if ctx.opts.refill_large {
        images.push(("large", ctx.catalog.large.clone()));
    }
    let labels: Vec<String> = images.iter().map(|(_, i)| image_label(i)).collect();
    let title = format!(
        "9. Refill: an empty node from the bucket vs from the upstream (1 client, whole GETs; {})",
        labels.join(", ")
    );
    let skip = |ctx: &mut Ctx, why: String| {
        eprintln!("bench: [9] skipped: {why}");
        let notes = vec![format!("Skipped: {why}")];
        let section = Section {
            scenario: 9,
            title: format!("{title}: skipped"),
            notes,
            table: Table::Transfer(vec![]),
            base: PeerKind::Bucket,
        };
        println!("{}", crate::report::render_section(&section));
        ctx.sections.push(section);
    };
    if let Some(why) = bucket::missing() {
        return skip(ctx, why);
    }
    // In the run directory, so the bucket goes with the run.
    let s3 = match S3sFs::start(&ctx.peers.run_dir().join("s3s-fs")).await {
        Ok(s) => s,
        Err(e) => return skip(ctx, e),
    };
    ctx.peers.set_bucket_config(&s3.config_toml());
    let peers = ctx.peers_of(&[PeerKind::Bucket, PeerKind::Wharf]);
    let mut notes = Vec::new();
    if peers.contains(&PeerKind::Bucket) {
        notes.push(seed_bucket(ctx, &s3, &images).await);
    }
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for rate in ctx.opts.rates.clone() {
        ctx.set_rate(rate);
        for (key, img) in &images {
            let case = format!("{}, {rate} MB/s", image_label(img));
            let mut runs: Vec<Vec<(Row, BucketUse)>> = peers.iter().map(|_| Vec::new()).collect();
            for _ in 0..ctx.opts.repeat {
                for (i, &peer) in peers.iter().enumerate() {
                    runs[i].push(refill_run(ctx, &s3, peer, &case, key, img).await);
                    // Its disk holds the image: free it before the other peer's turn.
                    ctx.peers.stop(peer);
                }
            }
            let medians: Vec<(Row, BucketUse)> = runs.into_iter().filter_map(median_run).collect();
            let find = |kind: PeerKind| medians.iter().find(|(r, _)| r.peer == kind && r.errors.is_empty());
            if let (Some((b, used)), Some((u, _))) = (find(PeerKind::Bucket), find(PeerKind::Wharf)) {
                let wall = |r: &Row| r.wall.first().copied().unwrap_or(f64::NAN);
                summary.push(format!(
                    "{case}: wall {:.2} s from the bucket vs {:.2} s from the upstream ({:.2}×); wharf CPU {:.2} vs \
                     {:.2} CPU-s/GiB ({:.2}×); upstream {} vs {} MB; bucket read {:.0} MB ({:.2}× the image)",
                    wall(b),
                    wall(u),
                    wall(b) / wall(u),
                    b.cpu_per_gib(),
                    u.cpu_per_gib(),
                    b.cpu_per_gib() / u.cpu_per_gib(),
                    crate::report::mb(b.m.up.bytes),
                    crate::report::mb(u.m.up.bytes),
                    used.read / 1e6,
                    used.read / img.bytes() as f64,
                ));
            }
            rows.extend(medians.into_iter().map(|(r, _)| r));
        }
    }
    if !summary.is_empty() {
        notes.insert(0, format!("Bucket / upstream, medians: {}.", summary.join("; ")));
    }
    notes.push(format!(
        "Each case: a new wharf on an empty disk with the bucket (`[storage.s3]` in a config file; s3s-fs {}, \
         files on the run directory's disk, on loopback) and a new wharf on an empty disk without it, taking turns, each pulling the image \
         with one client ({} concurrent requests); each figure the median run by MB/s of {} run(s). CPU is \
         wharf's only (s3s-fs's is in the details). Upstream MB counts every response through the shim: the \
         manifest by tag still comes from the upstream (tags never go to the bucket); blob requests are in the \
         details.",
        s3.version, ctx.opts.downloads, ctx.opts.repeat
    ));
    ctx.peers.stop(PeerKind::Bucket);
    ctx.push_vs(9, title, rows, notes, PeerKind::Bucket);
}

/// One wharf with the bucket pulls `images` from the unthrottled upstream; waits until the bucket holds
/// every blob (uploads run after the pull). Returns the report note.
async fn seed_bucket(ctx: &mut Ctx, s3: &S3sFs, images: &[(&str, Image)]) -> String {
    let target = ctx.peers.cold(PeerKind::Bucket).await;
    let plain: Vec<Image> = images.iter().map(|(_, i)| i.clone()).collect();
    let t = Instant::now();
    ctx.warm_up(&target, &plain).await;
    let pulled = t.elapsed().as_secs_f64();
    let mut blobs: Vec<Blob> = plain.iter().flat_map(|i| i.blobs().into_iter().cloned()).collect();
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    blobs.dedup_by(|a, b| a.digest == b.digest);
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    // Generous for 2 shared cores, yet bounded.
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_secs_f64(total as f64 / 5e6);
    let t = Instant::now();
    let (mut written, mut stored);
    loop {
        written = metric_sum(std::slice::from_ref(&target.url), BUCKET_WRITTEN).await;
        stored = blobs.iter().filter(|b| s3.has_blob(&b.digest, b.size)).count();
        if stored == blobs.len() || written >= total as f64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waited = t.elapsed().as_secs_f64();
    let complete = stored == blobs.len();
    let note = format!(
        "Seed: a wharf with the bucket pulled {} from the unthrottled upstream in {pulled:.1} s; {waited:.1} s \
         later {stored} of the {} blobs were in the bucket and it counted {:.0} MB written of {:.0} MB{}.",
        plain.iter().map(|i| i.repo.as_str()).collect::<Vec<_>>().join(" and "),
        blobs.len(),
        written / 1e6,
        total as f64 / 1e6,
        if complete { "" } else { " (**incomplete**: the bucket runs below read partly from the upstream)" }
    );
    if !complete {
        eprintln!("bench: [9] uploads incomplete after {waited:.0} s; wharf logs:\n{}", ctx.peers.wharf_logs(40));
    }
    eprintln!("bench: [9] {note}");
    ctx.peers.stop(PeerKind::Bucket);
    note
}

/// One cold run of scenario 9: a new `peer` (the bucket wharf or plain wharf) pulls `img` with one client.
async fn refill_run(
    ctx: &mut Ctx,
    s3: &S3sFs,
    peer: PeerKind,
    case: &str,
    key: &'static str,
    img: &Image,
) -> (Row, BucketUse) {
    let target = ctx.peers.cold(peer).await;
    let before = BucketUse::of(&target.url).await;
    let s3_cpu = procs::cpu_seconds(s3.proc.pid());
    let job = pull_all(&target.url, vec![(img.clone(), Mode::Whole)], ctx.opts.downloads);
    let (res, m) = ctx.measured(&target, job).await;
    let s3_cpu = procs::cpu_seconds(s3.proc.pid()) - s3_cpu;
    let used = BucketUse::of(&target.url).await.since(before);
    let blob_requests: u64 = m.up.requests.iter().filter(|(k, _)| k.contains("blob")).map(|(_, v)| v).sum();
    let spec = RowSpec {
        scenario: 9,
        case: case.to_string(),
        image: key,
        mode: "whole".into(),
        peer,
        reference_bytes: img.bytes(),
    };
    let mut row = pull_row(spec, &res, m);
    row.note = if peer == PeerKind::Bucket {
        format!(
            "upstream blob requests {blob_requests}; bucket read {:.0} MB ({:.2}× the image), written {:.0} MB, \
             lookups hit {:.0} / miss {:.0} / error {:.0}; s3s-fs CPU {s3_cpu:.2} s",
            used.read / 1e6,
            used.read / img.bytes() as f64,
            used.written / 1e6,
            used.hits,
            used.misses,
            used.errors
        )
    } else {
        format!("no bucket; upstream blob requests {blob_requests}")
    };
    if !row.errors.is_empty() {
        eprintln!("bench: [9] errors; wharf logs:\n{}", ctx.peers.wharf_logs(40));
    }
    (row, used)
}

/// Scenario 10: warm pulls of the app image from wharf alone, then with `--idle-connections` keep-alive
/// connections held open (each made one `GET /v2/` first); peak RSS over both, and whether every idle
/// connection still answers at the end.
pub async fn idle_connections(ctx: &mut Ctx) {
    let n = ctx.opts.idle_connections;
    let img = ctx.catalog.app.clone();
    let target = ctx.peers.cold(PeerKind::Wharf).await;
    ctx.warm_up(&target, std::slice::from_ref(&img)).await;
    // The idle connections are ours too.
    if let Err(e) = wharf::server::raise_open_files_limit() {
        eprintln!("bench: could not raise the open files limit: {e}");
    }
    let case = |idle: bool| {
        if idle {
            format!("{}, warm, with {n} idle connections", image_label(&img))
        } else {
            format!("{}, warm, no idle connections", image_label(&img))
        }
    };
    let mut rows = Vec::new();
    rows.push(warm_runs(ctx, &target, &img, case(false)).await);
    let host = target.url.trim_start_matches("http://").to_string();
    let (opened, m_open) = ctx.measured(&target, open_idle(&host, n)).await;
    let mut notes = Vec::new();
    match opened {
        Ok(mut conns) => {
            let mut with_idle = warm_runs(ctx, &target, &img, case(true)).await;
            let answered = answer_again(&mut conns).await;
            with_idle.note = format!(
                "{} idle connections opened ({} KiB RSS peak while opening); {answered} of {} answered a second \
                 request after the pulls",
                conns.len(),
                m_open.peak_rss_kib,
                conns.len()
            );
            with_idle.m.peak_rss_kib = with_idle.m.peak_rss_kib.max(m_open.peak_rss_kib);
            let (alone, busy) = (rows[0].mbps(), with_idle.mbps());
            notes.push(format!(
                "With the idle connections the pulls ran at {busy:.0} MB/s against {alone:.0} MB/s without: \
                 {:.2}× the time.",
                if busy > 0.0 { alone / busy } else { f64::INFINITY }
            ));
            rows.push(with_idle);
            notes.push(format!(
                "Each idle connection sent one `GET /v2/` and read its answer, then stayed open; wharf parks an \
                 HTTP/1.1 connection idle for 200 ms (its HTTP buffers released). Each figure is the median of {} \
                 runs.",
                ctx.opts.repeat
            ));
        }
        Err(e) => notes.push(format!("opening {n} idle connections failed: {e}")),
    }
    let title = format!("10. Warm pulls with {n} idle keep-alive connections held open (1 client)");
    ctx.push(10, title, rows, notes);
}

/// `--repeat` warm pulls of `img` from `target`: the median run.
async fn warm_runs(ctx: &Ctx, target: &Target, img: &Image, case: String) -> Row {
    let mut all = Vec::new();
    for _ in 0..ctx.opts.repeat {
        let job = pull_all(&target.url, vec![(img.clone(), Mode::Whole)], ctx.opts.downloads);
        let (res, m) = ctx.measured(target, job).await;
        let spec = RowSpec {
            scenario: 10,
            case: case.clone(),
            image: "app",
            mode: Mode::Whole.name(),
            peer: PeerKind::Wharf,
            reference_bytes: img.bytes(),
        };
        all.push(pull_row(spec, &res, m));
    }
    median_row(all).expect("at least one run")
}

/// Opens `n` connections to `host`, 500 at a time, each sending one `GET /v2/` and reading its answer.
async fn open_idle(host: &str, n: usize) -> R<Vec<tokio::net::TcpStream>> {
    use futures_util::StreamExt;
    let opened: Vec<R<tokio::net::TcpStream>> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut s = tokio::net::TcpStream::connect(host).await.map_err(|e| e.to_string())?;
            ask_base(&mut s).await?;
            Ok(s)
        })
        .buffer_unordered(500)
        .collect()
        .await;
    opened.into_iter().collect()
}

/// `GET /v2/` on `s`, reading the whole answer (`{}`); an error unless it is a 200.
async fn ask_base(s: &mut tokio::net::TcpStream) -> R<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: wharf\r\n\r\n").await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"{}")) {
        let k = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        if k == 0 {
            return Err("closed before the answer".into());
        }
        got.extend_from_slice(&buf[..k]);
    }
    if got.starts_with(b"HTTP/1.1 200") { Ok(()) } else { Err(String::from_utf8_lossy(&got).into_owned()) }
}

/// How many of `conns` answer a second `GET /v2/`.
async fn answer_again(conns: &mut [tokio::net::TcpStream]) -> usize {
    use futures_util::StreamExt;
    futures_util::stream::iter(conns.iter_mut())
        .map(|s| async move { ask_base(s).await.is_ok() })
        .buffer_unordered(500)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

/// Scenario 11: the CPU of one cold GET of the large layer through a fresh wharf (the fill and serving the
/// client) against the floor for the same bytes on this machine: receiving them from the same origin
/// (`curl -o /dev/null`), hashing them (`openssl dgst -sha256`, SHA extensions like `sha2`) and writing them
/// (`dd` of as many bytes into a file). Three origins, as `--peers` names them: the unthrottled upstream
/// (`wharf`), a peer that has the blob (`cluster`: the edge node's CPU), and the bucket (`bucket`). Receiving
/// is measured per origin: on loopback it costs the receiver more from a sender that uses `sendfile(2)` (a
/// peer) than from one that writes from its own buffers (the registry). Medians of `--repeat` runs.
pub async fn fill_floor(ctx: &mut Ctx) {
    let img = ctx.catalog.large.clone();
    let Some(blob) = img.blobs().into_iter().max_by_key(|b| b.size) else { return };
    let blob = blob.clone();
    ctx.set_rate(0);
    let file = crate::origin::blob_path(&ctx.origin_root, &blob.digest);
    let run_dir = ctx.origin_root.parent().and_then(|p| p.parent()).unwrap_or(&ctx.origin_root).to_path_buf();
    let scratch = run_dir.join("floor-write");
    let mut parts = FloorParts { hash_file: file, scratch, size: blob.size, hashes: Vec::new(), writes: Vec::new() };
    let mut notes = Vec::new();
    let mut origins = Vec::new();
    if ctx.opts.peers.contains(&PeerKind::Wharf) {
        let mut up = OriginFill::new("the upstream (docker-registry, unthrottled)");
        for _ in 0..ctx.opts.repeat {
            let url = format!("{}/v2/{}/blobs/{}", ctx.shim.url(), img.repo, blob.digest);
            up.receive.push(child_cpu(std::process::Command::new("curl").args(["-s", "-o", "/dev/null", &url])));
            parts.measure();
            let target = ctx.peers.cold(PeerKind::Wharf).await;
            let (res, m) = ctx.measured(&target, one_blob(&target.url, &img.repo, &blob)).await;
            match res {
                Ok(_) => up.fill.push(m.cpu_s),
                Err(e) => up.notes.push(format!("a cold GET failed: {e}")),
            }
        }
        ctx.peers.stop(PeerKind::Wharf);
        origins.push(up);
    }
    if ctx.opts.peers.contains(&PeerKind::Cluster) {
        origins.push(peer_fills(ctx, &img, &blob, &mut parts).await);
    }
    if ctx.opts.peers.contains(&PeerKind::Bucket) {
        origins.push(bucket_fills(ctx, &img, &blob, &mut parts).await);
    }
    let (hashes, writes) = (parts.hashes, parts.writes);
    let least = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let gib = blob.size as f64 / GIB as f64;
    let (hash, write) = (median(hashes.clone()), median(writes.clone()));
    notes.push(format!(
        "The {gib:.2} GiB layer; CPU-s of each child from `wait4`. Hash (openssl): {hash:.2} (runs: {}); write \
         (dd into the run directory's file system): {write:.2} (runs: {}). Both run right before each fill, so \
         that dd's pages, freed again, are the ones the fill writes into: on this VM, page-cache pages the guest \
         has not touched for a while cost many times more to fill (1 GiB of dd: 0.23 to 7 CPU-s). dd still varies, \
         so the floor is also given from each part's best run.",
        runs(&hashes),
        runs(&writes)
    ));
    let mut table = vec![
        "| fill from | wharf CPU-s (runs) | CPU-s/GiB | receive (curl) | floor, medians | floor, best parts | \
         wharf / floor (medians) | wharf / floor (best) |"
            .to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for o in &origins {
        let (fill, receive) = (median(o.fill.clone()), median(o.receive.clone()));
        let floor = receive + hash + write;
        let best = least(&o.receive) + least(&hashes) + least(&writes);
        let line = format!(
            "| {} | {fill:.2} ({}) | {:.2} | {receive:.2} ({}) | {floor:.2} | {best:.2} | {:.2}× | **{:.2}×** |",
            o.name,
            runs(&o.fill),
            fill / gib,
            runs(&o.receive),
            fill / floor,
            fill / best
        );
        eprintln!("bench: [11] {line}");
        table.push(line);
        notes.extend(o.notes.iter().cloned());
    }
    notes.insert(0, table.join("\n"));
    let section = Section {
        scenario: 11,
        title: "11. A cold fill's CPU against the floor (receive, hash, write the same bytes)".into(),
        notes,
        table: Table::Transfer(Vec::new()),
        base: PeerKind::Wharf,
    };
    println!("{}", crate::report::render_section(&section));
    ctx.sections.push(section);
}

/// Scenario 11's floor for hashing and writing the layer's bytes, measured anew before every fill.
struct FloorParts {
    /// The origin registry's copy of the layer, hashed by `openssl`.
    hash_file: std::path::PathBuf,
    /// Where `dd` writes as many bytes (removed after each run).
    scratch: std::path::PathBuf,
    size: u64,
    hashes: Vec<f64>,
    writes: Vec<f64>,
}

impl FloorParts {
    fn measure(&mut self) {
        self.hashes
            .push(child_cpu(std::process::Command::new("openssl").args(["dgst", "-sha256"]).arg(&self.hash_file)));
        // The same number of bytes from /dev/zero (receiving is measured per origin), into the page cache on
        // the filesystem wharf writes to, in pieces of the size wharf writes (its body chunks, tens of KiB):
        // 1 MiB writes sometimes cost dd many times more CPU on this VM. No sync: the flusher threads write
        // back for wharf too, outside its CPU time.
        self.writes.push(child_cpu(
            std::process::Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", self.scratch.display()))
                .arg(format!("count={}", self.size.div_ceil(64 * 1024)))
                .args(["bs=64k", "status=none"]),
        ));
        let _ = std::fs::remove_file(&self.scratch);
    }
}

/// Scenario 11's figures for one origin.
struct OriginFill {
    name: &'static str,
    /// CPU-s of the filling wharf per run (the fill and serving its client).
    fill: Vec<f64>,
    /// CPU-s of `curl -o /dev/null` receiving the same bytes from the same origin.
    receive: Vec<f64>,
    notes: Vec<String>,
}

impl OriginFill {
    fn new(name: &'static str) -> OriginFill {
        OriginFill { name, fill: Vec::new(), receive: Vec::new(), notes: Vec::new() }
    }
}

/// Scenario 11 from a peer: a cold cluster's owner of the blob fills it from the unthrottled upstream; curl
/// receives it from the owner (the same server, the same `sendfile` path the peer API uses); then a node that
/// has never had it fills it from the owner while serving one client: that node's CPU.
async fn peer_fills(ctx: &mut Ctx, img: &Image, blob: &Blob, parts: &mut FloorParts) -> OriginFill {
    let mut o = OriginFill::new("a peer (the blob's owner in a 3-node cluster)");
    let mut served = Vec::new();
    for _ in 0..ctx.opts.repeat {
        let target = ctx.peers.cold(PeerKind::Cluster).await;
        let ranked = wharf::cluster::hrw::rank(target.peer_addrs.iter().map(String::as_str), &blob.digest);
        let index = |addr: &str| target.peer_addrs.iter().position(|p| p == addr).expect("a node");
        let (owner, edge) = (index(ranked[0]), index(ranked[1]));
        if let Err(e) = one_blob(&target.urls[owner], &img.repo, blob).await {
            o.notes.push(format!("warming the owner failed: {e}"));
            continue;
        }
        let url = format!("{}/v2/{}/blobs/{}", target.urls[owner], img.repo, blob.digest);
        o.receive.push(child_cpu(std::process::Command::new("curl").args(["-s", "-o", "/dev/null", &url])));
        parts.measure();
        let (edge_cpu, owner_cpu) = (procs::cpu_seconds(target.pids[edge]), procs::cpu_seconds(target.pids[owner]));
        match one_blob(&target.urls[edge], &img.repo, blob).await {
            Ok(_) => {
                o.fill.push(procs::cpu_seconds(target.pids[edge]) - edge_cpu);
                served.push(procs::cpu_seconds(target.pids[owner]) - owner_cpu);
            }
            Err(e) => o.notes.push(format!("the GET through another node failed: {e}")),
        }
    }
    ctx.peers.stop(PeerKind::Cluster);
    o.notes.push(format!(
        "Peer fill: the owner's CPU while it served the blob to the filling node: {} CPU-s.",
        runs(&served)
    ));
    o
}

/// Scenario 11 from the bucket: s3s-fs is seeded with the blob by a wharf with the bucket; then, per run, curl
/// receives the object (signed as wharf signs) and a new wharf with the bucket on an empty disk fills it from
/// there while serving one client.
async fn bucket_fills(ctx: &mut Ctx, img: &Image, blob: &Blob, parts: &mut FloorParts) -> OriginFill {
    let mut o = OriginFill::new("the bucket (s3s-fs)");
    if let Some(why) = bucket::missing() {
        o.notes.push(format!("Bucket fill skipped: {why}"));
        return o;
    }
    let s3 = match S3sFs::start(&ctx.peers.run_dir().join("s3s-fs-11")).await {
        Ok(s) => s,
        Err(e) => {
            o.notes.push(format!("Bucket fill skipped: {e}"));
            return o;
        }
    };
    ctx.peers.set_bucket_config(&s3.config_toml());
    let seeded = seed_bucket(ctx, &s3, &[("large", img.clone())]).await;
    o.notes.push(format!("Bucket fill: {seeded}"));
    for _ in 0..ctx.opts.repeat {
        o.receive.push(child_cpu(&mut s3.curl_get(&blob.digest)));
        let target = ctx.peers.cold(PeerKind::Bucket).await;
        parts.measure();
        let read = metric_sum(std::slice::from_ref(&target.url), BUCKET_READ).await;
        let (res, m) = ctx.measured(&target, one_blob(&target.url, &img.repo, blob)).await;
        let read = metric_sum(std::slice::from_ref(&target.url), BUCKET_READ).await - read;
        match res {
            Ok(_) if read >= blob.size as f64 => o.fill.push(m.cpu_s),
            Ok(_) => o.notes.push(format!("a run read only {read:.0} bytes from the bucket: left out")),
            Err(e) => o.notes.push(format!("a cold GET failed: {e}")),
        }
        ctx.peers.stop(PeerKind::Bucket);
    }
    o
}

/// CPU seconds (user + system) the command took, run to completion; NaN if it could not run. Read from
/// `wait4` for that child alone: the bench reaps other children (stopped peers) meanwhile.
fn child_cpu(cmd: &mut std::process::Command) -> f64 {
    let Ok(child) = cmd.stdout(std::process::Stdio::null()).spawn() else { return f64::NAN };
    let (mut status, mut u): (libc::c_int, libc::rusage) = (0, unsafe { std::mem::zeroed() });
    // SAFETY: our own child's pid and valid pointers; the child is reaped here and not waited on again.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = pid > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if ok { secs(u.ru_utime) + secs(u.ru_stime) } else { f64::NAN }
}

/// Scenario 12's registry name for pulls through wharf: wharf's configured upstream, so that the `?ns=`
/// containerd adds routes there.
const CRI_VIA_WHARF: &str = "origin.test";
/// Scenario 12's registry name whose hosts.toml names the origin registry itself.
const CRI_DIRECT: &str = "direct.test";

/// One timed CRI pull of scenario 12.
struct CriRun {
    /// `PullImage`, call to answer (fetch and unpack).
    secs: f64,
    /// From the call until the layer was committed to containerd's content store (fetched and verified).
    fetched: Option<f64>,
    /// CPU seconds of the server (wharf or the origin registry) and of containerd.
    server_cpu: f64,
    containerd_cpu: f64,
    /// Resident fraction of wharf's and the registry's blob file just before the call.
    resident: (f64, f64),
    /// Requests wharf sent its upstream during the call (tag revalidation).
    upstream: String,
}

/// Scenario 12 (issue 15, goal 4): the kubelet's own path. containerd's CRI image service (`PullImage`, as
/// the kubelet calls it) pulls a one-layer image through a warm wharf and straight from the origin registry
/// (no shim), the two taking turns, `--repeat` times each with the blob files' pages cold (evicted with
/// `posix_fadvise` before each run) and warm (read in before each run). Before each run the image is removed
/// from containerd and the layer checked to be gone from its content store, so each pull downloads it.
pub async fn cri_pull(ctx: &mut Ctx) {
    let title = "12. The kubelet's pull: CRI PullImage through wharf vs from the registry".to_string();
    let skip = |ctx: &mut Ctx, why: String| {
        eprintln!("bench: [12] skipped: {why}");
        let section = Section {
            scenario: 12,
            title: format!("{title}: skipped"),
            notes: vec![format!("Skipped: {why}")],
            table: Table::Transfer(vec![]),
            base: PeerKind::Wharf,
        };
        println!("{}", crate::report::render_section(&section));
        ctx.sections.push(section);
    };
    if !ctx.opts.peers.contains(&PeerKind::Wharf) {
        return skip(ctx, "wharf is not among --peers".into());
    }
    if let Some(why) = cri::missing() {
        return skip(ctx, why);
    }
    let Some(img) = ctx.catalog.cri.clone() else { return skip(ctx, "the CRI image was not seeded".into()) };
    let layer = img.layers[0].clone();
    // The comparison is with a registry on this machine: wharf's tag revalidations (after its tag TTL) go to
    // the origin without the shim's rate limit or added latency.
    let (rate, latency) = (ctx.shim.rate(), ctx.shim.latency());
    ctx.shim.set_rate(0);
    ctx.shim.set_latency(Duration::ZERO);
    let target = ctx.peers.cold(PeerKind::Wharf).await;
    ctx.warm_up(&target, std::slice::from_ref(&img)).await;
    let registry_pid = ctx.peers.current(PeerKind::Direct).await.pids[0];
    let files = [
        ctx.peers.wharf_blob_path(&layer.digest).unwrap_or_default(),
        crate::origin::blob_path(&ctx.origin_root, &layer.digest),
    ];
    if let Some(f) = files.iter().find(|f| !f.is_file()) {
        ctx.shim.set_rate(rate);
        ctx.shim.set_latency(latency);
        return skip(ctx, format!("no blob file at {} after the warm-up", f.display()));
    }
    let hosts = ctx.peers.run_dir().join("cri-hosts");
    cri::write_hosts(&hosts, CRI_VIA_WHARF, &target.url);
    cri::write_hosts(&hosts, CRI_DIRECT, &ctx.origin_url);
    let ctd = match cri::Containerd::start(&ctx.peers.run_dir().join("containerd"), &hosts).await {
        Ok(c) => c,
        Err(e) => {
            ctx.shim.set_rate(rate);
            ctx.shim.set_latency(latency);
            return skip(ctx, e);
        }
    };
    let sides = [(PeerKind::Wharf, CRI_VIA_WHARF, target.pids[0]), (PeerKind::Direct, CRI_DIRECT, registry_pid)];
    let side_name = |p: PeerKind| if p == PeerKind::Wharf { "wharf" } else { "registry" };
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    // An untimed pull from each side first: containerd's first pull of a process pays one-time costs.
    let mut first = Vec::new();
    for &(peer, registry, pid) in &sides {
        let reference = format!("{registry}/{}:{}", img.repo, img.tag);
        match cri_run(ctx, &ctd, &reference, &layer.digest, pid, &files).await {
            Ok(r) => first.push(format!("{} {:.2} s", side_name(peer), r.secs)),
            Err(e) => problems.push(format!("untimed first pull from {}: {e}", side_name(peer))),
        }
    }
    let mut table = String::from(
        "| blob pages | from | PullImage s, median | runs (s) | layer fetched at (s), median | wharf / registry \
         | server CPU-s per pull | containerd CPU-s per pull |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut summary = Vec::new();
    for warm in [false, true] {
        let state = if warm { "warm" } else { "cold" };
        let mut runs: [Vec<CriRun>; 2] = [Vec::new(), Vec::new()];
        let mut fallbacks = Vec::new();
        for i in 0..ctx.opts.repeat {
            for (s, &(peer, registry, pid)) in sides.iter().enumerate() {
                if let Err(e) = page_state(&files, warm, &mut fallbacks) {
                    problems.push(format!("{state} run {}: preparing the page cache: {e}", i + 1));
                }
                let reference = format!("{registry}/{}:{}", img.repo, img.tag);
                match cri_run(ctx, &ctd, &reference, &layer.digest, pid, &files).await {
                    Ok(r) => {
                        eprintln!(
                            "bench: [12] {state} run {} from {}: {:.2} s (layer fetched at {}), server CPU {:.2} s, \
                             containerd CPU {:.2} s; resident before: wharf's file {:.0} %, the registry's {:.0} %; \
                             wharf's upstream requests: {}",
                            i + 1,
                            side_name(peer),
                            r.secs,
                            r.fetched.map(|f| format!("{f:.2} s")).unwrap_or_else(|| "?".into()),
                            r.server_cpu,
                            r.containerd_cpu,
                            r.resident.0 * 100.0,
                            r.resident.1 * 100.0,
                            r.upstream
                        );
                        runs[s].push(r);
                    }
                    Err(e) => {
                        eprintln!("bench: [12] {state} run {} from {}: {e}", i + 1, side_name(peer));
                        problems.push(format!("{state} run {} from {}: {e}", i + 1, side_name(peer)));
                    }
                }
            }
        }
        if !fallbacks.is_empty() {
            let n = fallbacks.len();
            eprintln!("bench: [12] {state}: eviction fell back to drop_caches {n} times: {}", fallbacks.join("; "));
            notes.push(format!("Cold runs where eviction fell back to drop_caches ({n}): {}.", fallbacks.join("; ")));
        }
        let medians: Vec<f64> = runs.iter().map(|r| median(r.iter().map(|r| r.secs).collect())).collect();
        let ratio = medians[0] / medians[1];
        summary.push(format!("{state} **{ratio:.3}×** ({:.2} s / {:.2} s)", medians[0], medians[1]));
        for (s, &(peer, ..)) in sides.iter().enumerate() {
            let r = &runs[s];
            let list = |f: fn(&CriRun) -> f64| r.iter().map(|r| format!("{:.2}", f(r))).collect::<Vec<_>>().join(", ");
            let fetched = median(r.iter().filter_map(|r| r.fetched).collect());
            table.push_str(&format!(
                "| {state} | {} | {:.2} | {} | {fetched:.2} (runs {}) | {} | {:.2} | {:.2} |\n",
                side_name(peer),
                medians[s],
                list(|r| r.secs),
                list(|r| r.fetched.unwrap_or(f64::NAN)),
                if s == 0 { format!("{ratio:.3}×") } else { String::new() },
                median(r.iter().map(|r| r.server_cpu).collect()),
                median(r.iter().map(|r| r.containerd_cpu).collect()),
            ));
        }
    }
    let line = format!("wharf / registry, medians of PullImage: {}", summary.join("; "));
    eprintln!("bench: [12] {line}");
    notes.insert(0, format!("{line}.\n\n{table}"));
    notes.push(format!(
        "{} via its CRI plugin (image service, native snapshotter), a `PullImage` of `{}` ({}: one uncompressed \
         tar layer, {} bytes, holding one file of random bytes) per run, the registry name's hosts.toml naming \
         either a warm wharf (`{CRI_VIA_WHARF}`) or the origin docker-registry on loopback (`{CRI_DIRECT}`). \
         Runs alternate wharf, registry, …, {} of each per page state. Before each run: `RemoveImage`, a check \
         that containerd holds neither the layer's blob nor a snapshot, `sync`, and the blob files of both \
         servers evicted (`POSIX_FADV_DONTNEED`, residency checked with `mincore`) or read in. \"Layer fetched \
         at\": when the layer appeared, committed, in containerd's content store (the rest is the unpack). \
         Server CPU: wharf's or the registry's. wharf's upstream is the origin without the shim's limits (tag \
         revalidations only). Untimed first pulls: {}.",
        ctd.version,
        format_args!("{}/{}:{}", CRI_VIA_WHARF, img.repo, img.tag),
        size_label(layer.size),
        layer.size,
        ctx.opts.repeat,
        if first.is_empty() { "none".to_string() } else { first.join(", ") }
    ));
    if !problems.is_empty() {
        notes.push(format!("Problems: {}.", problems.join("; ")));
        eprintln!("bench: [12] containerd's last log lines:\n{}", ctd.proc.log_tail(30));
    }
    drop(ctd);
    ctx.shim.set_rate(rate);
    ctx.shim.set_latency(latency);
    let section = Section { scenario: 12, title, notes, table: Table::Transfer(Vec::new()), base: PeerKind::Wharf };
    println!("{}", crate::report::render_section(&section));
    ctx.sections.push(section);
}

/// `v` as `1.23, 4.56, …`: the runs behind a median.
fn runs(v: &[f64]) -> String {
    v.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join(", ")
}

/// The median of `v` (the lower middle one of an even count); NaN if empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[(v.len() - 1) / 2] }
}

/// Syncs, then evicts `files`' pages (cold) or reads them in (warm). Eviction is checked: should
/// `posix_fadvise` leave more than 1 % of a file resident, the whole clean page cache is dropped too, and
/// what stayed is said in `fallbacks` (a page mapped by a process stays whatever is asked).
fn page_state(files: &[std::path::PathBuf; 2], warm: bool, fallbacks: &mut Vec<String>) -> Result<(), String> {
    // SAFETY: sync has no preconditions. Dirty pages cannot be evicted, and the last run's writeback would
    // otherwise go on during this one.
    unsafe { libc::sync() };
    for f in files {
        let done = if warm { cri::read_in(f) } else { cri::evict(f) };
        done.map_err(|e| format!("{}: {e}", f.display()))?;
    }
    if warm {
        return Ok(());
    }
    let resident = || files.each_ref().map(|f| cri::resident(f).unwrap_or(1.0));
    let after = resident();
    if after.iter().all(|&r| r <= 0.01) {
        return Ok(());
    }
    cri::drop_caches().map_err(|e| format!("drop_caches: {e}"))?;
    let dropped = resident();
    fallbacks.push(format!(
        "after POSIX_FADV_DONTNEED wharf's blob file was {:.1} % resident and the registry's {:.1} %; after          drop_caches {:.1} % and {:.1} %",
        after[0] * 100.0,
        after[1] * 100.0,
        dropped[0] * 100.0,
        dropped[1] * 100.0
    ));
    Ok(())
}

/// One CRI pull of `reference` (whose layer is `digest`) served by `server_pid`, then `RemoveImage`. Fails
/// without pulling if containerd still holds the layer: its content store dedups by digest, so the pull
/// would not download it.
async fn cri_run(
    ctx: &Ctx,
    ctd: &cri::Containerd,
    reference: &str,
    digest: &str,
    server_pid: i32,
    files: &[std::path::PathBuf; 2],
) -> R<CriRun> {
    let left = ctd.leftovers(digest);
    if !left.is_empty() {
        return Err(format!("containerd still held the layer before the pull ({})", left.join(", ")));
    }
    let resident = (cri::resident(&files[0]).unwrap_or(f64::NAN), cri::resident(&files[1]).unwrap_or(f64::NAN));
    let committed = ctd.content_path(digest);
    let done = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if committed.exists() {
                    return Some(t.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            None
        })
    };
    let (server0, ctd0, up0) =
        (procs::cpu_seconds(server_pid), procs::cpu_seconds(ctd.proc.pid()), ctx.shim.snapshot());
    let pulled = ctd.pull(reference).await;
    let secs = t.elapsed().as_secs_f64();
    let (server_cpu, containerd_cpu) =
        (procs::cpu_seconds(server_pid) - server0, procs::cpu_seconds(ctd.proc.pid()) - ctd0);
    done.store(true, Ordering::Relaxed);
    let fetched = watcher.await.unwrap_or(None);
    let upstream = ctx.shim.snapshot().since(&up0).summary();
    // By the id too: it names the image whatever reference pulled it.
    let id = pulled.as_ref().ok().cloned();
    let removed = ctd.remove(reference).await;
    if let Some(id) = id {
        ctd.remove(&id).await?;
    }
    pulled?;
    removed?;
    Ok(CriRun { secs, fetched, server_cpu, containerd_cpu, resident, upstream })
}
