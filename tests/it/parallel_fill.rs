//! Upstream parallel range fill: a large cold blob is fetched as concurrent range requests written at their
//! offsets; clients stream the verified-in-order prefix, and the digest is still checked over the whole blob.

use crate::support::fake_upstream::{FakeUpstream, Outcome, Pace, blob_path, client, fetch, get_ok};
use crate::support::wharf::Wharf;
use std::collections::HashSet;

const MIB: usize = 1 << 20;

/// wharf with 1 MiB range chunks, at most 4 in flight, mirroring `fake`.
fn start(fake: &FakeUpstream, dir: &tempfile::TempDir) -> Wharf {
    start_with(fake, dir, 4)
}

/// wharf with 1 MiB range chunks, at most `concurrency` in flight, mirroring `fake`.
fn start_with(fake: &FakeUpstream, dir: &tempfile::TempDir, concurrency: usize) -> Wharf {
    let config = dir.path().join("wharf.toml");
    let toml = format!("[upstream]\nfill_chunk_size = 1048576\nfill_concurrency = {concurrency}\n");
    std::fs::write(&config, toml).unwrap();
    let mut args = fake.wharf_args();
    args.extend(["--config".to_string(), config.display().to_string()]);
    Wharf::start(&dir.path().join("data"), &args)
}

fn ranges_of(fake: &FakeUpstream, digest: &str) -> Vec<String> {
    fake.blob_ranges(digest).into_iter().map(|r| r.expect("every upstream GET is ranged")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_cold_blob_is_fetched_as_ranges_and_verified() {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    let (digest, data) = fake.add_random_blob(10 * MIB + 12345);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    get_ok(&client(), &url, &data).await;

    let ranges = ranges_of(&fake, &digest);
    let distinct: HashSet<_> = ranges.iter().collect();
    assert_eq!(ranges.len(), 11, "one request per 1 MiB chunk: {ranges:?}");
    assert_eq!(distinct.len(), 11, "no chunk fetched twice: {ranges:?}");
    assert!(ranges.contains(&"bytes=0-1048575".to_string()), "{ranges:?}");
    assert!(ranges.contains(&format!("bytes=10485760-{}", data.len() - 1)), "{ranges:?}");
    assert!(blob_path(&wharf.data_dir, &digest).is_file(), "blob committed");

    // Warm: no more upstream requests.
    get_ok(&client(), &url, &data).await;
    assert_eq!(fake.blob_ranges(&digest).len(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_ignores_ranges_is_streamed_once() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(5 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    assert_eq!(fake.blob_gets(&digest), 1, "the 200 answer to the first range is the whole blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_chunk_is_resumed_from_where_it_stopped() {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    let (digest, data) = fake.add_random_blob(6 * MIB);
    let cut = 5 * MIB + MIB / 2;
    fake.drop_range(&digest, cut, 1);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    let ranges = ranges_of(&fake, &digest);
    assert_eq!(ranges.len(), 7, "six chunks plus one resume: {ranges:?}");
    let resumed: Vec<_> =
        ranges.iter().filter(|r| r.starts_with("bytes=5") && !r.starts_with("bytes=5242880-")).collect();
    assert_eq!(resumed.len(), 1, "the broken chunk restarts past its start, not from scratch: {ranges:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_bytes_in_ranges_are_never_served_complete_nor_committed() {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    let (digest, _data) = fake.add_random_blob(4 * MIB + 1);
    fake.wrong_bytes(&digest, true);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    match fetch(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &[]).await {
        Outcome::Complete(status, _, body) => {
            panic!("a complete response ({status}, {} bytes) for bad bytes", body.len())
        }
        Outcome::Broken(..) | Outcome::Failed(..) => {}
    }
    assert!(!blob_path(&wharf.data_dir, &digest).exists(), "bad bytes were committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_clients_share_one_ranged_fill() {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    let (digest, data) = fake.add_random_blob(8 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let c = client();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, url, data) = (c.clone(), url.clone(), data.clone());
            tokio::spawn(async move { get_ok(&c, &url, &data).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fake.blob_ranges(&digest).len(), 8, "each chunk fetched once for all 20 clients");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_that_keeps_failing_ends_the_fill_and_the_next_request_refills() {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    let (digest, data) = fake.add_random_blob(6 * MIB);
    fake.drop_range(&digest, 3 * MIB + 7, 100);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&fake, &dir);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    // A deadline, not a timing: a fill whose hasher waited forever would never end this response.
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), fetch(&client(), &url, &[])).await;
    match outcome.expect("the failed fill ended its response") {
        Outcome::Complete(status, _, body) => {
            panic!("complete response ({status}, {} bytes) from a failed fill", body.len())
        }
        Outcome::Broken(..) | Outcome::Failed(..) => {}
    }
    assert!(!blob_path(&wharf.data_dir, &digest).exists(), "a partial blob was committed");
    fake.drop_range(&digest, 0, 0);
    get_ok(&client(), &url, &data).await;
}

/// The `connections=` ramp of wharf's `ranged transfer done` line for `digest`.
fn ramp_of(wharf: &Wharf, digest: &str) -> String {
    let log = wharf.log();
    let line = log.lines().find(|l| l.contains("ranged transfer done") && l.contains(digest));
    let line = line.unwrap_or_else(|| panic!("no ranged transfer line for {digest}:\n{log}"));
    line.split("connections=").nth(1).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_owned()
}

/// Pulls a random blob of `len` bytes through wharf (at most 16 requests in flight) from an upstream that
/// sends ranges at `pace`; returns the most ranged requests at once, wharf's ramp and the requests made.
async fn paced_pull(pace: Pace, len: usize) -> (usize, String, usize) {
    let fake = FakeUpstream::start().await;
    fake.honor_ranges(true);
    fake.pace(Some(pace));
    let (digest, data) = fake.add_random_blob(len);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start_with(&fake, &dir, 16);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    (fake.ranged_in_flight_max(), ramp_of(&wharf, &digest), fake.blob_ranges(&digest).len())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fill_adds_connections_while_each_one_raises_the_rate() {
    // A CDN that limits each connection: every added request adds its own 4 MiB/s.
    let (most, ramp, _) = paced_pull(Pace::PerResponse(4 * MIB as u64), 40 * MIB).await;
    assert!((8..=16).contains(&most), "{most} requests at once (ramp {ramp}): it should grow past 4, never past 16");
    assert!(ramp.starts_with("1@0,2@"), "the ramp starts from one request: {ramp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_limits_only_its_total_gets_no_requests_that_do_not_help() {
    // All responses share 8 MiB/s: a second request adds nothing.
    let (most, ramp, requests) = paced_pull(Pace::Total(8 * MIB as u64), 16 * MIB).await;
    assert!(most <= 2, "{most} requests at once (ramp {ramp}): more than the one doubling that did not pay");
    assert!(ramp.contains(",1@"), "back to one request after two did not pay: {ramp}");
    assert_eq!(requests, 16, "one request per chunk");
}
