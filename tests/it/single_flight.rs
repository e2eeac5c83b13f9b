//! Single flight: however many clients ask for a cold blob at once, wharf fetches it upstream exactly once
//! and streams it to all of them; a warm blob causes no upstream traffic; a HEAD never starts a download.

use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, get_ok, wait_until};
use crate::support::wharf::Wharf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

const CLIENTS: usize = 50;

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_clients_cause_one_upstream_get() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(4 * 1024 * 1024 + 4321);
    // Hold the upstream body after 1 MiB so every client provably arrives while the fill is in flight.
    let gate = up.gate(&digest, 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    let with_headers = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, with_headers) = (http.clone(), url.clone(), with_headers.clone());
        tasks.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.expect("response headers");
            with_headers.fetch_add(1, SeqCst);
            let status = resp.status().as_u16();
            (status, resp.bytes().await.map_err(|e| format!("{e:?}")))
        }));
    }
    wait_until("all 50 clients got response headers while the upstream body is held", || {
        with_headers.load(SeqCst) == CLIENTS
    })
    .await;
    assert_eq!(up.blob_gets(&digest), 1, "50 concurrent misses must share one upstream GET");
    gate.release();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200);
        let body = body.expect("complete body");
        assert!(body == data, "a client got bytes that differ from the blob");
    }
    assert_eq!(up.blob_gets(&digest), 1, "exactly one upstream GET for the whole first round");

    // The fill commits; a second round is served from disk without asking upstream.
    let path = blob_path(dir.path(), &digest);
    wait_until("the blob is committed", || path.is_file()).await;
    assert!(std::fs::read(&path).unwrap() == data, "committed file content");
    let mut round2 = Vec::new();
    for _ in 0..CLIENTS {
        let (http, url, data) = (http.clone(), url.clone(), data.clone());
        round2.push(tokio::spawn(async move { get_ok(&http, &url, &data).await }));
    }
    for t in round2 {
        t.await.unwrap();
    }
    assert_eq!(up.blob_gets(&digest), 1, "a warm blob must not be fetched upstream again");
    assert_eq!(up.blob_heads(&digest), 0, "nor revalidated (blobs are immutable)");
}

#[tokio::test(flavor = "multi_thread")]
async fn head_on_a_cold_blob_starts_no_download() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(1024 * 1024 + 7);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    for _ in 0..3 {
        let resp = http.head(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "HEAD of a blob that exists upstream");
        let h = resp.headers();
        assert_eq!(h["content-length"], data.len().to_string().as_str());
        assert_eq!(h["docker-content-digest"], digest.as_str());
        // wharf answered, so any upstream GET it made to learn the size has already been counted.
        assert_eq!(up.blob_gets(&digest), 0, "a HEAD must not download the blob");
    }
    assert!(!blob_path(dir.path(), &digest).exists(), "a HEAD committed the blob");

    // The counter works and the HEADs left no fill behind to join: the first GET fetches once.
    get_ok(&http, &url, &data).await;
    assert_eq!(up.blob_gets(&digest), 1);
}
