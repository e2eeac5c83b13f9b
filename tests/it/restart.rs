//! Crash safety: a `kill -9` during a fill leaves nothing that is later served as the blob, and the blob
//! files are the truth: with the metadata database deleted, cached blobs are still served without upstream.

use crate::support::fake_upstream::{FakeUpstream, REPO, blob_path, client, get_ok, wait_until};
use crate::support::wharf::Wharf;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Directories under `dir` that hold a sled database (sled writes `conf` and `db` files).
fn sled_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if d.join("conf").is_file() && d.join("db").is_file() {
            found.push(d);
            continue;
        }
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                todo.push(entry.path());
            }
        }
    }
    found
}

/// Every regular file under `dir` whose content equals a prefix of `data` (a partial copy of the blob).
fn partial_copies(dir: &Path, data: &[u8]) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let (path, meta) = (entry.path(), entry.metadata().unwrap());
            if meta.is_dir() {
                todo.push(path);
            } else if meta.len() > 0 && (meta.len() as usize) < data.len() {
                let content = std::fs::read(&path).unwrap();
                if data.starts_with(&content) {
                    found.push((path, meta.len()));
                }
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_a_fill_then_restart_serves_the_right_blob() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(3 * 1024 * 1024 + 99);
    let gate = up.gate(&digest, 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let mut wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let http = client();

    // Start the fill and make sure wharf has written part of it before it dies.
    let mut resp = http.get(&url).send().await.expect("headers");
    assert_eq!(resp.status(), 200);
    gate.wait_reached().await;
    let first = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
        .await
        .expect("first bytes while the upstream is held")
        .unwrap()
        .expect("a chunk");
    assert!(!first.is_empty());
    wharf.kill9();
    let mut rest = Ok(());
    while rest.is_ok() {
        match resp.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the body ended cleanly although wharf was killed mid-fill"),
            Err(e) => rest = Err(e),
        }
    }
    let path = blob_path(&wharf.data_dir, &digest);
    assert!(!path.exists(), "a partial blob was committed before the crash");
    let leftovers = partial_copies(&wharf.data_dir, &data);
    println!("partial files left by the crash: {leftovers:?}");

    // Restart on the same data dir with a healthy upstream: the pull is complete and correct.
    gate.release();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], data.len().to_string().as_str());
    get_ok(&http, &url, &data).await;
    assert_eq!(up.blob_gets(&digest), 2, "the interrupted fill must be redone once after the restart");
    wait_until("the blob is committed", || path.is_file()).await;
    assert!(std::fs::read(&path).unwrap() == data, "committed file content");
    get_ok(&http, &url, &data).await;
    assert_eq!(up.blob_gets(&digest), 2, "served from disk once committed");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_metadata_db_keeps_cached_blobs_served_without_upstream() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<_> = [700_000, 1, 2 * 1024 * 1024].into_iter().map(|n| up.add_random_blob(n)).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut wharf = Wharf::start(dir.path(), &up.wharf_args());
    let http = client();
    for (digest, data) in &blobs {
        get_ok(&http, &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), data).await;
        let path = blob_path(dir.path(), digest);
        wait_until("the blob is committed", || path.is_file()).await;
    }
    wharf.terminate();

    let meta = sled_dirs(dir.path());
    assert!(!meta.is_empty(), "no sled database found under {}", dir.path().display());
    println!("deleting metadata: {meta:?}");
    for m in &meta {
        std::fs::remove_dir_all(m).unwrap();
    }

    let seen_before = up.requests().len();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    for (digest, data) in &blobs {
        let url = format!("{}/v2/{REPO}/blobs/{digest}", wharf.url());
        let head = http.head(&url).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {digest} after the metadata was deleted");
        assert_eq!(head.headers()["content-length"], data.len().to_string().as_str());
        assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
        get_ok(&http, &url, data).await;
        if data.len() > 1 {
            let resp = http.get(&url).header("range", "bytes=1-").send().await.unwrap();
            assert_eq!(resp.status(), 206);
            assert!(resp.bytes().await.unwrap() == data.slice(1..));
        }
        assert_eq!(up.blob_gets(digest), 1, "{digest} was fetched upstream again");
    }
    let after: Vec<_> = up.requests().into_iter().skip(seen_before).collect();
    let about_blobs: Vec<_> = after.iter().filter(|r| r.path.contains("/blobs/")).collect();
    assert!(about_blobs.is_empty(), "cached blobs caused upstream requests: {about_blobs:?}");
}
