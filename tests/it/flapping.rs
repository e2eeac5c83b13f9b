//! A flapping upstream: bursts of connection resets, 500/503/429, cut and stalled bodies and wrong bytes
//! (a seeded storm, `WHARF_FLAP_SEED` replays it). Cached content (blobs, manifests by digest, tags within and
//! after the freshness window) keeps being served; cold pulls either deliver the right bytes or fail clearly,
//! within a deadline derived from the upstream timeouts; and no partial file survives the storm or a restart.

use crate::support::data_dir::{audit, blob_bytes};
use crate::support::fake_upstream::{FakeUpstream, Flap, REPO, blob_path, client, sha256_digest};
use crate::support::wharf::Wharf;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// wharf's `upstream.connect_timeout` and `upstream.read_timeout` here, in seconds: small, so stalls end fast.
const CONNECT_TIMEOUT: u64 = 1;
const READ_TIMEOUT: u64 = 1;
/// `upstream.fill_chunk_size`: blobs larger than this are fetched as concurrent ranges, each retried twice.
const CHUNK: usize = 1 << 20;
const FILL_CONCURRENCY: usize = 2;
/// Passes over the cached content per wharf while the storm lasts: each pass makes the revalidating wharf
/// send two tag `HEAD`s, so with the cold pulls' six or more requests the storm sees at least 27 (every flap).
const WARM_PASSES: usize = 12;
/// Tries per cold item while the storm lasts.
const COLD_TRIES: usize = 3;

/// The longest one upstream request may take before wharf gives up on it: connecting, then one stall of at
/// most `read_timeout` (for the headers or mid-body), plus another `read_timeout` for the bytes themselves.
fn per_upstream_request() -> Duration {
    Duration::from_secs(CONNECT_TIMEOUT + 2 * READ_TIMEOUT)
}

/// Slack for a loaded machine: the deadlines are upper bounds, not performance targets.
const SLACK: Duration = Duration::from_secs(5);

/// A cached answer needs at most one upstream request (a tag's revalidation `HEAD`) before it is served.
fn warm_deadline() -> Duration {
    per_upstream_request() + SLACK
}

/// A cold blob takes one request, or for a ranged fill the first range plus three tries per chunk.
fn cold_deadline(size: usize) -> Duration {
    let requests = if size > CHUNK { 1 + 3 * size.div_ceil(CHUNK) } else { 1 };
    per_upstream_request() * requests as u32 + SLACK
}

/// How a response through wharf ended; each variant passed the checks of [`get_checked`].
#[derive(Debug)]
enum Seen {
    /// The right bytes, complete.
    Complete,
    /// `503 UNAVAILABLE` (what makes containerd try its next host), sent before any body byte.
    Unavailable,
    /// The right status, then a broken connection before the end; `wrong` when the bytes sent were not the
    /// upstream's (wharf streams a fill before it is verified and holds back only the last byte, so bytes
    /// from an upstream that sent garbage reach the client, but the response can never complete).
    Broken { wrong: bool },
}

/// One request and the bytes it must yield.
#[derive(Clone)]
struct Check {
    path: String,
    head: bool,
    range: Option<(usize, usize)>,
    /// The whole blob or manifest.
    want: Bytes,
    digest: String,
}

impl Check {
    fn get(path: String, want: &Bytes) -> Check {
        Check { path, head: false, range: None, want: want.clone(), digest: sha256_digest(want) }
    }
}

/// Sends `c` to wharf and checks the answer: a complete `200`/`206` whose every byte matches, one that breaks
/// before its end (never a short clean end), or `503` with the OCI code `UNAVAILABLE`. `Err` explains anything
/// else.
async fn get_checked(http: &reqwest::Client, base: &str, c: &Check) -> Result<Seen, String> {
    let url = format!("{base}{}", c.path);
    let mut req = if c.head { http.head(&url) } else { http.get(&url) };
    if c.path.contains("/manifests/") {
        req = req.header("accept", OCI_MANIFEST);
    }
    if let Some((a, b)) = c.range {
        req = req.header("range", format!("bytes={a}-{b}"));
    }
    let mut resp = req.send().await.map_err(|e| format!("{url}: no response from wharf: {e:?}"))?;
    let status = resp.status().as_u16();
    if status >= 500 {
        let body = resp.bytes().await.map_err(|e| format!("{url}: {status} with a broken body: {e:?}"))?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return match (status, v["errors"][0]["code"].as_str()) {
            (503, Some("UNAVAILABLE")) => Ok(Seen::Unavailable),
            (503, None) if c.head => Ok(Seen::Unavailable),
            _ => Err(format!("{url}: {status} {}, want 503 UNAVAILABLE", String::from_utf8_lossy(&body))),
        };
    }
    let (want_status, want) = match c.range {
        Some((a, b)) => (206, c.want.slice(a..=b)),
        None => (200, c.want.clone()),
    };
    if status != want_status {
        return Err(format!("{url}: status {status}, want {want_status} or a 5xx"));
    }
    let header = |h: &str| resp.headers().get(h).and_then(|v| v.to_str().ok()).map(str::to_string);
    if c.range.is_none() && header("docker-content-digest").is_some_and(|d| d != c.digest) {
        return Err(format!("{url}: Docker-Content-Digest {:?}, want {}", header("docker-content-digest"), c.digest));
    }
    if header("content-length").is_some_and(|l| l != want.len().to_string()) {
        return Err(format!("{url}: Content-Length {:?}, want {}", header("content-length"), want.len()));
    }
    if c.head {
        return Ok(Seen::Complete);
    }
    let (mut got, mut wrong) = (0, None);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if wrong.is_none() && want.get(got..got + chunk.len()) != Some(&chunk[..]) {
                    wrong = Some(got);
                }
                got += chunk.len();
            }
            Ok(None) if got != want.len() => {
                return Err(format!("{url}: clean end after {got} of {} bytes", want.len()));
            }
            Ok(None) => match wrong {
                None => return Ok(Seen::Complete),
                Some(at) => return Err(format!("{url}: a complete response with wrong bytes from offset {at}")),
            },
            Err(_) => return Ok(Seen::Broken { wrong: wrong.is_some() }),
        }
    }
}

/// [`get_checked`] within `deadline`; panics on a wrong answer or a missed deadline.
async fn within(http: &reqwest::Client, base: &str, c: &Check, deadline: Duration) -> Seen {
    let started = Instant::now();
    match tokio::time::timeout(deadline, get_checked(http, base, c)).await {
        Ok(Ok(seen)) => seen,
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("{}: no complete answer within {deadline:?} (started {:?} ago)", c.path, started.elapsed()),
    }
}

/// A manifest listing `blobs` as layers.
fn manifest(blobs: &[(String, Bytes)]) -> Bytes {
    let layers: Vec<_> = blobs
        .iter()
        .map(|(d, b)| serde_json::json!({"mediaType": "application/octet-stream", "digest": d, "size": b.len()}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": layers}))
        .unwrap()
        .into()
}

fn start(up: &FakeUpstream, data: &Path, config: &Path, tag_ttl: &str) -> Wharf {
    let mut args = up.wharf_args();
    args.extend(["--config", config.to_str().unwrap(), "--tag-ttl", tag_ttl].map(String::from));
    Wharf::start(data, &args)
}

/// Waits (polling the gauge: another process has no other signal) until `wharf` runs no fill.
async fn fills_settle(wharf: &Wharf) {
    let deadline = Instant::now() + cold_deadline(3 * CHUNK);
    while wharf.metric("wharf_fills_in_flight").await > 0.0 {
        assert!(Instant::now() < deadline, "fills still running long after the storm ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flapping_upstream_keeps_cached_pulls_working_and_cold_pulls_honest() {
    let seed = std::env::var("WHARF_FLAP_SEED").map_or_else(|_| rand::random(), |v| v.parse().expect("a number"));
    println!("flapping: WHARF_FLAP_SEED={seed}");
    let up = FakeUpstream::start().await;
    up.honor_ranges(true);
    let add = |n: usize| up.add_random_blob(n);
    let warm: Vec<(String, Bytes)> = [300_000, 2 * CHUNK + 12_345].map(add).into();
    let cold: Vec<(String, Bytes)> = [1, 200_000, 700_000, CHUNK, 2 * CHUNK + 999].map(add).into();
    let (warm_manifest, cold_manifest) = (manifest(&warm), manifest(&cold));
    up.put_manifest(REPO, "warm", OCI_MANIFEST, warm_manifest.clone());
    up.put_manifest(REPO, "cold", OCI_MANIFEST, cold_manifest.clone());

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    let toml = format!(
        "[upstream]\nconnect_timeout = {CONNECT_TIMEOUT}\nread_timeout = {READ_TIMEOUT}\n\
         fill_chunk_size = {CHUNK}\nfill_concurrency = {FILL_CONCURRENCY}\n"
    );
    std::fs::write(&config, toml).unwrap();
    // Tags within the freshness window (never revalidated) and after it (revalidated on every request).
    let (fresh_dir, stale_dir) = (dir.path().join("fresh"), dir.path().join("stale"));
    let fresh = start(&up, &fresh_dir, &config, "3600");
    let mut stale = start(&up, &stale_dir, &config, "0");
    let http = client();

    let mut cached = vec![
        Check::get(format!("/v2/{REPO}/manifests/warm"), &warm_manifest),
        Check::get(format!("/v2/{REPO}/manifests/{}", sha256_digest(&warm_manifest)), &warm_manifest),
    ];
    cached.extend(warm.iter().map(|(d, b)| Check::get(format!("/v2/{REPO}/blobs/{d}"), b)));
    for wharf in [&fresh, &stale] {
        for c in &cached {
            let seen = within(&http, &wharf.url(), c, cold_deadline(c.want.len())).await;
            assert!(matches!(seen, Seen::Complete), "{} with a healthy upstream: {seen:?}", c.path);
        }
    }
    cached.push(Check { head: true, ..cached[0].clone() });
    let (big, big_bytes) = &warm[1];
    let range = Some((CHUNK - 7, CHUNK + 70_000));
    cached.push(Check { range, ..Check::get(format!("/v2/{REPO}/blobs/{big}"), big_bytes) });

    let mut colds: Vec<Check> = cold.iter().map(|(d, b)| Check::get(format!("/v2/{REPO}/blobs/{d}"), b)).collect();
    colds.push(Check::get(format!("/v2/{REPO}/manifests/cold"), &cold_manifest));
    colds.push(Check::get(format!("/v2/{REPO}/manifests/{}", sha256_digest(&cold_manifest)), &cold_manifest));
    let (last, last_bytes) = cold.last().unwrap();
    let range = Some((CHUNK / 2, 2 * CHUNK + 500));
    colds.push(Check { range, ..Check::get(format!("/v2/{REPO}/blobs/{last}"), last_bytes) });

    up.start_flapping(seed);
    let storm_started = Instant::now();
    let mut tasks = Vec::new();
    for base in [fresh.url(), stale.url()] {
        let (http, cached) = (http.clone(), cached.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..WARM_PASSES {
                for c in &cached {
                    let seen = within(&http, &base, c, warm_deadline()).await;
                    assert!(matches!(seen, Seen::Complete), "cached {} during the storm: {seen:?}", c.path);
                }
            }
            Vec::new()
        }));
    }
    for c in colds.clone() {
        let (http, base) = (http.clone(), stale.url());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..COLD_TRIES {
                seen.push(within(&http, &base, &c, cold_deadline(c.want.len())).await);
                if matches!(seen.last(), Some(Seen::Complete)) {
                    break;
                }
            }
            seen
        }));
    }
    let mut cold_seen: Vec<Seen> = Vec::new();
    for t in tasks {
        cold_seen.extend(t.await.unwrap());
    }
    up.stop_flapping();
    let flaps = up.flaps();
    println!("storm of {:.1?}: flaps {flaps:?}", storm_started.elapsed());
    let wrong = cold_seen.iter().filter(|s| matches!(s, Seen::Broken { wrong: true })).count();
    println!("cold pulls during the storm: {cold_seen:?} ({wrong} broken after garbage from the upstream)");
    let total: usize = flaps.values().sum();
    assert!(total >= 3 * Flap::ALL.len(), "only {total} upstream requests met the storm");
    for kind in Flap::ALL {
        assert!(flaps.get(&kind).is_some_and(|n| *n > 0), "the storm never produced {kind:?}: {flaps:?}");
    }
    assert!(
        cold_seen.iter().any(|s| !matches!(s, Seen::Complete)),
        "no cold pull met a fault: the storm did not reach them"
    );
    let stale_served = stale.metric("wharf_stale_manifests_served_total").await;
    assert!(stale_served > 0.0, "the revalidating wharf never served a tag stale during the storm");

    // The storm is over: fills end, nothing partial remains, and every cold item now arrives intact.
    let mut verified = HashMap::new();
    for (wharf, data) in [(&fresh, &fresh_dir), (&stale, &stale_dir)] {
        fills_settle(wharf).await;
        assert_eq!(audit(data, false, &mut verified), 0, "temporary files after the fills settled");
        let counted = wharf.metric("wharf_cache_used_bytes").await as u64;
        assert_eq!(counted, blob_bytes(data), "cached bytes wharf counts after the storm vs the blob files");
    }
    for c in &colds {
        let seen = within(&http, &stale.url(), c, cold_deadline(c.want.len())).await;
        assert!(matches!(seen, Seen::Complete), "{} after the storm: {seen:?}", c.path);
    }
    for (d, _) in &cold {
        assert!(blob_path(&stale_dir, d).is_file(), "cold blob {d} not committed after a clean pull");
    }

    // After a crash and a restart the store holds only verified files and serves them through another storm.
    // Tags are left out here: sled writes its log in the background, so a crash may forget the newest ones.
    stale.kill9();
    audit(&stale_dir, true, &mut verified);
    let mut stale = start(&up, &stale_dir, &config, "0");
    assert_eq!(audit(&stale_dir, false, &mut verified), 0, "temporary files after a restart");
    let counted = stale.metric("wharf_cache_used_bytes").await as u64;
    assert_eq!(counted, blob_bytes(&stale_dir), "cached bytes wharf counts after a crash vs the blob files");
    let by_digest = |c: &&Check| !c.path.ends_with("/warm") && !c.path.ends_with("/cold");
    up.start_flapping(seed ^ 1);
    for c in cached.iter().chain(&colds).filter(by_digest) {
        let seen = within(&http, &stale.url(), c, warm_deadline()).await;
        assert!(matches!(seen, Seen::Complete), "{} cached before the crash: {seen:?}", c.path);
    }
    up.stop_flapping();

    // After a clean shutdown every tag is remembered too (relearned here, just before it), and served stale
    // while the upstream flaps.
    for c in cached.iter().chain(&colds).filter(|c| !by_digest(c)) {
        let seen = within(&http, &stale.url(), c, warm_deadline()).await;
        assert!(matches!(seen, Seen::Complete), "{} with a healthy upstream: {seen:?}", c.path);
    }
    assert!(stale.terminate().is_some_and(|s| s.success()), "wharf did not shut down cleanly");
    let stale = start(&up, &stale_dir, &config, "0");
    up.start_flapping(seed ^ 2);
    for c in cached.iter().chain(&colds) {
        let seen = within(&http, &stale.url(), c, warm_deadline()).await;
        assert!(matches!(seen, Seen::Complete), "{} cached before the restart: {seen:?}", c.path);
    }
    up.stop_flapping();
    assert_eq!(audit(&stale_dir, false, &mut verified), 0);
}
