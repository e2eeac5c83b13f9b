//! The shared bucket tier against a real S3 server (moto): what one node fetched from the upstream lands in
//! the bucket once, verified; a node with an empty disk refills from the bucket instead of the upstream.

use crate::support::fake_upstream::{FakeUpstream, Outcome, client, fetch, get_ok, sha256_digest};
use crate::support::moto::Moto;
use crate::support::wharf::Wharf;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Polls `cond` (blocking) every 50 ms; panics naming `what` after 30 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_fills_the_bucket_once_and_an_empty_node_refills_from_it() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    // Three 8 MiB parts and a one-part blob.
    let blobs = [fake.add_random_blob(20 * MIB + 5), fake.add_random_blob(1000)];
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args(dir.path()));
    let first = Wharf::start(&dir.path().join("first"), &args);
    for (digest, data) in &blobs {
        get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", first.url()), data).await;
    }
    let mut want: Vec<String> = blobs.iter().map(|(d, _)| key(d)).collect();
    want.sort();
    eventually("both blobs are in the bucket", || {
        let mut keys = moto.keys();
        keys.sort();
        keys == want
    })
    .await;
    assert_eq!(moto.unfinished_uploads(), 0, "a multipart upload was left unfinished");
    for (digest, data) in &blobs {
        let object = moto.object(&key(digest));
        assert_eq!(sha256_digest(&object), *digest, "the bucket holds other bytes than the blob");
        assert_eq!(object.len(), data.len());
    }
    drop(first);

    // A node with an empty disk and the same bucket: no upstream blob request, the bucket's bytes verified.
    let second = Wharf::start(&dir.path().join("second"), &args);
    for (digest, data) in &blobs {
        get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", second.url()), data).await;
        assert_eq!(fake.blob_gets(digest), 1, "the empty node went to the upstream for {digest}");
    }
    let read: usize = blobs.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(second.metric("wharf_bucket_bytes_total{reason=\"read\"}").await, read as f64);
    assert_eq!(moto.keys().len(), 2, "the refill uploaded again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_fails_verification_uploads_nothing() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    let (digest, _) = fake.add_random_blob(9 * MIB);
    fake.wrong_bytes(&digest, true);
    let (good, good_data) = fake.add_random_blob(1000);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args(dir.path()));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let wrong = fetch(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &[]).await;
    assert!(!matches!(wrong, Outcome::Complete(200, _, _)), "a wrong blob was served complete");
    // A good blob afterwards: once it is in the bucket, the bad one's upload would have been too.
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{good}", wharf.url()), &good_data).await;
    eventually("the good blob is in the bucket", || moto.keys().contains(&key(&good))).await;
    assert_eq!(moto.keys(), vec![key(&good)], "bytes that failed verification reached the bucket");
    assert_eq!(moto.unfinished_uploads(), 0);
}
