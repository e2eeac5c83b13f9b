//! Upstream parallel range fill: a large cold blob is fetched as concurrent range requests written at their
//! offsets; clients stream the verified-in-order prefix, and the digest is still checked over the whole blob.

use crate::support::fake_upstream::{FakeUpstream, Outcome, blob_path, client, fetch, get_ok};
use crate::support::wharf::Wharf;
use std::collections::HashSet;

const MIB: usize = 1 << 20;

/// wharf with 1 MiB range chunks, 4 in flight, mirroring `fake`.
fn start(fake: &FakeUpstream, dir: &tempfile::TempDir) -> Wharf {
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, "[upstream]\nfill_chunk_size = 1048576\nfill_concurrency = 4\n").unwrap();
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
