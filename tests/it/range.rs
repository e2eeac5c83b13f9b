//! Range requests (RFC 9110 §14) on blobs: `206` + `Content-Range` for `bytes=a-b` and `bytes=a-`, `416` +
//! `bytes */SIZE` when unsatisfiable, on committed blobs and on blobs still being filled; multi-range may be `200`.

use crate::support::fake_upstream::{
    FakeUpstream, Outcome, REPO, blob_path, client, fetch, get_ok, headers_of, sha256_digest, spawn_fetch, wait_until,
};
use crate::support::wharf::Wharf;
use bytes::Bytes;

/// Demands a clean `206` with the right `Content-Range` and exactly `want[a..=b]`.
fn check_206(range: &str, outcome: Outcome, want: &Bytes, a: usize, b: usize) {
    match outcome {
        Outcome::Complete(206, h, body) => {
            let size = want.len();
            assert_eq!(h["content-range"], format!("bytes {a}-{b}/{size}").as_str(), "{range}");
            assert_eq!(h["content-length"], (b - a + 1).to_string().as_str(), "{range}");
            assert!(body == want.slice(a..=b), "{range}: wrong bytes");
        }
        other => panic!("Range {range}: expected 206, got {other:?}"),
    }
}

async fn expect_206(http: &reqwest::Client, url: &str, range: &str, want: &Bytes, a: usize, b: usize) {
    check_206(range, fetch(http, url, &[("range", range)]).await, want, a, b);
}

async fn expect_416(http: &reqwest::Client, url: &str, range: &str, size: usize) {
    let resp = http.get(url).header("range", range).send().await.unwrap();
    assert_eq!(resp.status(), 416, "Range {range} on a {size}-byte blob");
    assert_eq!(resp.headers()["content-range"], format!("bytes */{size}").as_str(), "{range}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_a_cached_blob() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(1024 * 1024 + 17);
    let size = data.len();
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    let h = get_ok(&http, &url, &data).await;
    let path = blob_path(dir.path(), &digest);
    wait_until("the blob is committed", || path.is_file()).await;

    // A hit carries the headers clients rely on, on GET and HEAD.
    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    for h in [h, head.headers().clone()] {
        assert_eq!(h["content-length"], size.to_string().as_str());
        assert_eq!(h["docker-content-digest"], digest.as_str());
        assert_eq!(h["accept-ranges"], "bytes");
        assert!(h["etag"].to_str().unwrap().contains(&digest), "ETag names the digest");
    }

    expect_206(&http, &url, "bytes=0-0", &data, 0, 0).await;
    expect_206(&http, &url, "bytes=100-199", &data, 100, 199).await;
    expect_206(&http, &url, "bytes=100-", &data, 100, size - 1).await;
    expect_206(&http, &url, &format!("bytes={}-", size - 1), &data, size - 1, size - 1).await;
    expect_206(&http, &url, &format!("bytes={}-{}", size - 10, size - 1), &data, size - 10, size - 1).await;
    // A last-pos beyond the end is clamped to the size (RFC 9110 §14.1.2).
    expect_206(&http, &url, &format!("bytes=5-{}", size + 1000), &data, 5, size - 1).await;
    expect_416(&http, &url, &format!("bytes={size}-"), size).await;
    expect_416(&http, &url, &format!("bytes={}-{}", size + 5, size + 10), size).await;
    assert_eq!(up.blob_gets(&digest), 1, "ranges on a cached blob must not go upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn ranges_on_a_blob_still_being_filled() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(2 * 1024 * 1024 + 5);
    let size = data.len();
    let held = 512 * 1024;
    let gate = up.gate(&digest, held);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    // A full GET starts the fill, which stalls after `held` bytes.
    let (full, _) = spawn_fetch(&http, &url, &[]);
    gate.wait_reached().await;

    // Range requests join the fill in progress: their 206 headers arrive while the upstream is held
    // (wharf may hold their last byte until the whole blob is verified), and so does a 416.
    let (c, d) = (held + 10, size - 100);
    let ranges = [(0, 99), (1000, 4999), (1000, size - 1), (c, d), (held - 1, held)];
    let mut pending = Vec::new();
    for (a, b) in ranges {
        let range = if b == size - 1 { format!("bytes={a}-") } else { format!("bytes={a}-{b}") };
        let (task, headers) = spawn_fetch(&http, &url, &[("range", &range)]);
        let (status, h) = headers_of(&format!("Range {range} during the fill"), headers).await;
        assert_eq!(status, 206, "{range} during the fill");
        assert_eq!(h["content-range"], format!("bytes {a}-{b}/{size}").as_str(), "{range}");
        pending.push((range, task, a, b));
    }
    expect_416(&http, &url, &format!("bytes={size}-"), size).await;
    assert!(!gate.is_released(), "all of the above happened while the upstream was held");

    gate.release();
    for (range, task, a, b) in pending {
        check_206(&range, task.await.unwrap(), &data, a, b);
    }
    match full.await.unwrap() {
        Outcome::Complete(200, _, body) => assert!(body == data, "full body"),
        other => panic!("the GET that started the fill: {other:?}"),
    }
    assert_eq!(up.blob_gets(&digest), 1, "range requests must join the fill, not go upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_parallel_ranges_on_a_cold_blob_reassemble_the_digest() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(3 * 1024 * 1024 + 333);
    let size = data.len();
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    // Like containerd 2.1+ parallel layer fetch: fixed chunks, the last one open-ended.
    let chunk = size.div_ceil(8);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (a, b) = (i * chunk, ((i + 1) * chunk).min(size) - 1);
        let range = if i == 7 { format!("bytes={a}-") } else { format!("bytes={a}-{b}") };
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            match fetch(&http, &url, &[("range", &range)]).await {
                Outcome::Complete(206, h, body) => {
                    assert_eq!(h["content-range"], format!("bytes {a}-{b}/{size}").as_str());
                    body
                }
                other => panic!("Range {range}: expected 206, got {other:?}"),
            }
        }));
    }
    let mut whole = Vec::with_capacity(size);
    for t in tasks {
        whole.extend_from_slice(&t.await.unwrap());
    }
    assert_eq!(sha256_digest(&whole), digest, "the 8 ranges do not reassemble the blob");
    assert_eq!(up.blob_gets(&digest), 1, "8 concurrent ranges of a cold blob must share one upstream GET");
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_range_is_answered_whole_or_as_byteranges() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();
    get_ok(&http, &url, &data).await;

    // containers/image (zstd:chunked) accepts a 200 full body or a 206 multipart/byteranges.
    match fetch(&http, &url, &[("range", "bytes=0-9,20-29")]).await {
        Outcome::Complete(200, _, body) => assert!(body == data, "200 must carry the whole blob"),
        Outcome::Complete(206, h, body) => {
            let ct = h["content-type"].to_str().unwrap();
            assert!(ct.starts_with("multipart/byteranges"), "206 for two ranges: {ct}");
            for part in [&data[0..10], &data[20..30]] {
                assert!(body.windows(10).any(|w| w == part), "a requested part is missing");
            }
        }
        other => panic!("multi-range: expected 200 or 206, got {other:?}"),
    }
}
