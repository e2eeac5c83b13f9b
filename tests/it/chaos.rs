//! Crash chaos against the real upstream: wharf is killed with SIGKILL at seeded random points while it
//! cold-pulls the seeded images (256 MiB layer included) from docker-registry, restarted on the same data
//! directory, and everything is pulled again. Every byte any response carried is compared with the
//! origin's copy as it arrives: a complete response must be the blob (or range), a response cut by the
//! kill a byte-exact prefix of it. Between lives the data directory may hold only verified blobs and
//! manifests (and, while wharf is dead, temporary files that the next start removes).
//!
//! `WHARF_CHAOS_ROUNDS` (default 4) sets the rounds, `WHARF_CHAOS_SEED` replays a run; the long loop is
//! `WHARF_CHAOS_ROUNDS=100 cargo test --test it chaos -- --nocapture`.

use crate::support::data_dir::{audit, blob_bytes};
use crate::support::fake_upstream::{blob_path, client};
use crate::support::images::{DOCKER_LIST, DOCKER_MANIFEST, Manifest, OCI_INDEX, OCI_MANIFEST, TestImage};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const REGISTRY: &str = "registry.test";
const REPOS: [&str; 3] = ["test/multi", "test/docker", "test/big"];
/// Kills per round before the final, uninterrupted life on the same data directory.
const KILLS_PER_ROUND: usize = 2;
/// Upper bound for a whole pull of everything on a loaded machine (a hang is a failure, not a slow test).
const PULL_DEADLINE: Duration = Duration::from_secs(300);

/// The bytes a response must carry.
#[derive(Clone)]
enum Truth {
    /// A manifest, small enough to hold.
    Bytes(Arc<Vec<u8>>),
    /// A blob in the origin's storage (the exact bytes docker-registry serves), read at offsets on demand.
    File(Arc<std::fs::File>, u64),
}

impl Truth {
    fn len(&self) -> u64 {
        match self {
            Truth::Bytes(b) => b.len() as u64,
            Truth::File(_, len) => *len,
        }
    }

    /// Whether `got` is exactly the origin's bytes at `offset`.
    fn matches_at(&self, offset: u64, got: &[u8]) -> bool {
        match self {
            Truth::Bytes(b) => b.get(offset as usize..offset as usize + got.len()) == Some(got),
            Truth::File(f, len) => {
                if offset + got.len() as u64 > *len {
                    return false;
                }
                let mut want = vec![0u8; got.len()];
                f.read_exact_at(&mut want, offset).expect("read the origin's blob");
                want == got
            }
        }
    }
}

/// One GET a pull makes.
#[derive(Clone)]
struct Request {
    path: String,
    digest: String,
    manifest: bool,
    /// Inclusive byte range.
    range: Option<(u64, u64)>,
    truth: Truth,
}

impl Request {
    fn name(&self) -> String {
        match self.range {
            Some((a, b)) => format!("{} [{a}-{b}]", self.path),
            None => self.path.clone(),
        }
    }
}

/// How a response ended; every variant has passed the byte checks.
#[derive(Debug)]
enum Served {
    Complete,
    /// Headers, then the connection broke after this many correct bytes.
    Cut(u64),
    /// No response at all (refused or reset before headers).
    Refused,
}

/// Where a kill is aimed; the parameters are drawn from the seeded RNG.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A few milliseconds after the requests go out: mostly before any byte (manifests, upstream requests).
    Early(u64),
    /// Once the watched big-blob response has this many bytes: the fill is running.
    MidFill(u64),
    /// This many µs after the whole big blob was written (all but the held-back last byte reached the client):
    /// hashing, fsync and rename.
    AroundCommit(u64),
    /// As soon as the big blob's committed file shows up: within the directory fsync and metadata write that
    /// follow the rename, or (the window is short) just after the clients got their last byte.
    JustCommitted,
}

fn manifest_accept() -> String {
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ")
}

/// Every request a full pull of `images` makes, plus `ranges` on the big layer.
fn plan(
    images: &[TestImage],
    origin: &dyn Fn(&str) -> PathBuf,
    big: &(String, u64),
    ranges: &[(u64, u64)],
) -> Vec<Request> {
    let mut out = Vec::new();
    let mut files: HashMap<String, Arc<std::fs::File>> = HashMap::new();
    let mut file = |d: &str| {
        files
            .entry(d.to_string())
            .or_insert_with(|| Arc::new(std::fs::File::open(origin(d)).expect("origin blob")))
            .clone()
    };
    for image in images {
        let top = &image.manifests[0];
        let bytes = |m: &Manifest| Truth::Bytes(Arc::new(m.bytes.clone()));
        let path = format!("/v2/{}/manifests/{}", image.repo, image.tag);
        out.push(Request { path, digest: top.digest.clone(), manifest: true, range: None, truth: bytes(top) });
        for m in &image.manifests {
            let path = format!("/v2/{}/manifests/{}", image.repo, m.digest);
            out.push(Request { path, digest: m.digest.clone(), manifest: true, range: None, truth: bytes(m) });
        }
        for (d, size) in &image.blobs {
            let path = format!("/v2/{}/blobs/{d}", image.repo);
            out.push(Request {
                path,
                digest: d.clone(),
                manifest: false,
                range: None,
                truth: Truth::File(file(d), *size),
            });
        }
    }
    let big_path = format!("/v2/test/big/blobs/{}", big.0);
    for &r in ranges {
        let truth = Truth::File(file(&big.0), big.1);
        out.push(Request { path: big_path.clone(), digest: big.0.clone(), manifest: false, range: Some(r), truth });
    }
    out
}

/// GETs `req` through wharf, comparing every chunk with the origin as it arrives; `progress` gets the
/// running byte count. `Err` names a response that carried bytes not belonging to the digest.
async fn fetch_checked(
    http: &reqwest::Client,
    base: &str,
    req: &Request,
    progress: Option<watch::Sender<u64>>,
) -> Result<Served, String> {
    let name = req.name();
    let mut get = http.get(format!("{base}{}", req.path));
    if req.manifest {
        get = get.header("accept", manifest_accept());
    }
    if let Some((a, b)) = req.range {
        get = get.header("range", format!("bytes={a}-{b}"));
    }
    let mut resp = match get.send().await {
        Ok(r) => r,
        Err(_) => return Ok(Served::Refused),
    };
    let (start, expected) = match req.range {
        Some((a, b)) => (a, b + 1 - a),
        None => (0, req.truth.len()),
    };
    let want_status = if req.range.is_some() { 206 } else { 200 };
    if resp.status().as_u16() != want_status {
        return Err(format!("{name}: status {} while the upstream is healthy", resp.status()));
    }
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
    if header("docker-content-digest").is_some_and(|d| d != req.digest) {
        return Err(format!("{name}: Docker-Content-Digest {:?}", header("docker-content-digest")));
    }
    if let Some(len) = header("content-length").filter(|l| *l != expected.to_string()) {
        return Err(format!("{name}: Content-Length {len}, want {expected}"));
    }
    if let Some((a, b)) = req.range {
        let want = format!("bytes {a}-{b}/{}", req.truth.len());
        if header("content-range").as_deref() != Some(want.as_str()) {
            return Err(format!("{name}: Content-Range {:?}, want {want}", header("content-range")));
        }
    }
    let mut hasher = req.range.is_none().then(Sha256::new);
    let mut got = 0u64;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if got + chunk.len() as u64 > expected || !req.truth.matches_at(start + got, &chunk) {
                    return Err(format!("{name}: bytes {got}..+{} are not the origin's", chunk.len()));
                }
                if let Some(h) = &mut hasher {
                    h.update(&chunk);
                }
                got += chunk.len() as u64;
                if let Some(p) = &progress {
                    p.send_replace(got);
                }
            }
            Ok(None) if got == expected => break,
            Ok(None) => return Err(format!("{name}: clean end after {got} of {expected} bytes")),
            Err(_) => return Ok(Served::Cut(got)),
        }
    }
    if let Some(h) = hasher {
        let digest = format!("sha256:{}", hex::encode(h.finalize()));
        if digest != req.digest {
            return Err(format!("{name}: complete response hashes to {digest}"));
        }
    }
    Ok(Served::Complete)
}

fn rounds() -> usize {
    std::env::var("WHARF_CHAOS_ROUNDS").ok().map_or(4, |v| v.parse().expect("WHARF_CHAOS_ROUNDS: a number"))
}

fn seed() -> u64 {
    match std::env::var("WHARF_CHAOS_SEED") {
        Ok(v) => v.parse().expect("WHARF_CHAOS_SEED: a number"),
        Err(_) => rand::random(),
    }
}

struct Life<'a> {
    http: &'a reqwest::Client,
    requests: &'a [Request],
    big: &'a (String, u64),
}

/// What one life saw, for the log line and the phase checks.
#[derive(Default, Debug)]
struct Tally {
    complete: usize,
    cut: usize,
    /// Correct bytes the cut responses carried before the kill.
    cut_bytes: u64,
    refused: usize,
}

impl Life<'_> {
    /// Starts every request at once (the watched full GET of the big layer first); panics on any byte that
    /// does not belong to its digest. With `kill`, SIGKILLs wharf at that phase. Returns the big-layer bytes
    /// the watcher had at the kill, and how long the watcher waited for its held-back last byte
    /// (verification, fsync, rename) when it got it.
    async fn run(
        &self,
        wharf: &mut Wharf,
        kill: Option<Phase>,
        rng: &mut StdRng,
    ) -> (Tally, Option<u64>, Option<Duration>) {
        let base = wharf.url();
        let size = self.big.1;
        let (progress, mut watched) = watch::channel(0u64);
        let mut last_byte = watched.clone();
        let commit_window = tokio::spawn(async move {
            last_byte.wait_for(|got| *got + 1 >= size).await.ok()?;
            let t = Instant::now();
            last_byte.wait_for(|got| *got >= size).await.ok()?;
            Some(t.elapsed())
        });
        let watcher_at = self.requests.iter().position(|r| r.digest == self.big.0 && r.range.is_none()).unwrap();
        let mut order: Vec<usize> = (0..self.requests.len()).collect();
        order.swap(0, watcher_at);
        order[1..].shuffle(rng);
        let mut progress = Some(progress);
        let mut tasks = Vec::new();
        for i in order {
            let (http, req, base) = (self.http.clone(), self.requests[i].clone(), base.clone());
            let p = if i == watcher_at { progress.take() } else { None };
            tasks.push(tokio::spawn(async move { fetch_checked(&http, &base, &req, p).await }));
        }
        let mut at_kill = None;
        if let Some(phase) = kill {
            // A trigger that never comes (the watcher finished or broke first) fires the kill anyway.
            let trigger = async {
                match phase {
                    Phase::Early(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    Phase::MidFill(n) => drop(watched.wait_for(|got| *got >= n).await),
                    Phase::AroundCommit(us) => {
                        let _ = watched.wait_for(|got| *got + 1 >= size).await;
                        tokio::time::sleep(Duration::from_micros(us)).await;
                    }
                    Phase::JustCommitted => {
                        let _ = watched.wait_for(|got| *got + 1 >= size).await;
                        // No signal exists for a rename inside another process: poll the file system, tightly,
                        // since the window up to the clients' last byte is a directory fsync and a sled write.
                        let path = blob_path(&wharf.data_dir, &self.big.0);
                        while !path.exists() {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            };
            tokio::time::timeout(PULL_DEADLINE, trigger).await.expect("the kill trigger never fired");
            at_kill = Some(*watched.borrow());
            assert!(wharf.is_running(), "wharf exited on its own before the kill:\n{}", wharf.log());
            wharf.kill9();
        }
        let mut tally = Tally::default();
        for t in tasks {
            let served = tokio::time::timeout(PULL_DEADLINE, t).await.expect("a request hung").unwrap();
            match served.unwrap_or_else(|e| panic!("wrong bytes served: {e}")) {
                Served::Complete => tally.complete += 1,
                Served::Cut(n) => {
                    tally.cut += 1;
                    tally.cut_bytes += n;
                }
                Served::Refused => tally.refused += 1,
            }
        }
        (tally, at_kill, commit_window.await.unwrap())
    }
}

fn wharf_args(upstream: &str, config: &Path) -> Vec<String> {
    let up = format!("{REGISTRY}={upstream}");
    ["--upstream", &up, "--default-registry", REGISTRY, "--config", &config.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A kill point: round `round`'s first (cold) life takes the phases in turn, so four rounds cover them all;
/// later lives draw one. `window` is the last measured wait for the held-back last byte.
fn pick_phase(rng: &mut StdRng, round: usize, life: usize, size: u64, window: Duration) -> Phase {
    let which = if life == 0 { round % 4 } else { rng.random_range(0..4) };
    match which {
        0 => Phase::Early(rng.random_range(0..20)),
        1 => Phase::MidFill(rng.random_range(1..size - 1)),
        2 => Phase::AroundCommit(rng.random_range(0..=window.as_micros() as u64)),
        _ => Phase::JustCommitted,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_never_serves_wrong_bytes() {
    let seeded = shared();
    let (rounds, seed) = (rounds(), seed());
    println!("chaos: {rounds} rounds, WHARF_CHAOS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let images: Vec<TestImage> = REPOS.iter().map(|r| seeded.image(r).clone()).collect();
    let big = seeded.image("test/big").blobs.iter().max_by_key(|(_, s)| *s).unwrap().clone();
    assert!(big.1 >= 256 << 20, "the big layer is {} bytes", big.1);
    let origin = |d: &str| seeded.blob_path(d);
    let http = client();
    let started = Instant::now();
    let (mut kills, mut window) = (0, Duration::from_millis(50));

    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // Both fill paths: one stream, and concurrent ranges (chunk sizes that do and do not divide the blob).
        let (chunk, concurrency) = [(16 << 20, 1), (16 << 20, 4), (5 << 20, 3)][rng.random_range(0..3)];
        let config = dir.path().join("wharf.toml");
        let toml = format!("[upstream]\nfill_chunk_size = {chunk}\nfill_concurrency = {concurrency}\n");
        std::fs::write(&config, toml).unwrap();
        let args = wharf_args(&seeded.registry.url(), &config);
        let mut verified = HashMap::new();
        for life in 0..=KILLS_PER_ROUND {
            let ranges: Vec<(u64, u64)> = (0..2)
                .map(|_| {
                    let a = rng.random_range(0..big.1);
                    (a, rng.random_range(a..=(big.1 - 1).min(a + (64 << 20))))
                })
                .collect();
            let requests = plan(&images, &origin, &big, &ranges);
            let mut wharf = Wharf::start(&data, &args);
            assert_eq!(audit(&data, false, &mut verified), 0, "start-up must remove temporary files");
            // Eviction and the byte budget work from the metadata's sizes: a blob it lost would never be evicted.
            let counted = wharf.metric("wharf_cache_used_bytes").await as u64;
            assert_eq!(counted, blob_bytes(&data), "cached bytes wharf counts after a restart vs the blob files");
            let lived = Life { http: &http, requests: &requests, big: &big };
            let cold = !blob_path(&data, &big.0).exists();
            if life == KILLS_PER_ROUND {
                let (tally, _, w) = lived.run(&mut wharf, None, &mut rng).await;
                if cold && let Some(w) = w {
                    window = w;
                }
                println!("chaos round {round} final life (cold {cold}, last-byte wait {w:?}): {tally:?}");
                assert_eq!(tally.complete, requests.len(), "after the restart every pull must complete");
                let counted = wharf.metric("wharf_cache_used_bytes").await as u64;
                assert_eq!(counted, blob_bytes(&data), "cached bytes wharf counts after the pulls vs the blob files");
                assert!(wharf.terminate().is_some_and(|s| s.success()), "wharf did not shut down cleanly");
                assert_eq!(audit(&data, false, &mut verified), 0, "temporary files after a clean shutdown");
                assert!(blob_path(&data, &big.0).is_file(), "the big layer is not committed after a complete pull");
                continue;
            }
            let phase = pick_phase(&mut rng, round, life, big.1, window);
            let (tally, at_kill, w) = lived.run(&mut wharf, Some(phase), &mut rng).await;
            if cold && let Some(w) = w {
                window = w;
            }
            kills += 1;
            let at_kill = at_kill.unwrap();
            let committed = blob_path(&data, &big.0).exists();
            let tmp = audit(&data, true, &mut verified);
            println!(
                "chaos round {round} life {life} (chunk {chunk}, concurrency {concurrency}, cold {cold}): {phase:?}: \
                 big layer {at_kill}/{} bytes out at the kill, committed after: {committed}, {tmp} temporary files; \
                 {tally:?}",
                big.1
            );
            match phase {
                // The fill may finish before a slow watcher reaches `n`; the kill still comes after `n` bytes.
                Phase::MidFill(n) => assert!(at_kill >= n, "the watched response ended at {at_kill} < {n} bytes"),
                Phase::AroundCommit(_) => assert!(at_kill + 1 >= big.1, "AroundCommit kill before the download ended"),
                Phase::JustCommitted => assert!(committed, "JustCommitted kill before the commit"),
                _ => {}
            }
        }
    }
    println!("chaos: {kills} kills in {:.1?}", started.elapsed());
}
