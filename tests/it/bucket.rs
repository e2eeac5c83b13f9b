//! The shared bucket tier against a real S3 server (moto): what one node fetched from the upstream lands in
//! the bucket once, verified; a node with an empty disk refills from the bucket instead of the upstream.

use crate::support::fake_upstream::{FakeUpstream, Outcome, client, fetch, get_ok, sha256_digest};
use crate::support::moto::Moto;
use crate::support::s3s::S3sFs;
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

    // A node with an empty disk and the same bucket: no upstream blob request, the bucket's bytes verified,
    // the large blob read as 4 MiB ranges, several at once.
    let second_dir = dir.path().join("second-config");
    std::fs::create_dir_all(&second_dir).unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args_with(&second_dir, "\n[upstream]\nfill_chunk_size = 4194304\nfill_concurrency = 4\n"));
    let second = Wharf::start(&dir.path().join("second"), &args);
    refills_from_the_bucket(&fake, &second, &blobs).await;
    let ranges = moto.gets(&key(&blobs[0].0)).into_iter().filter(|s| *s == 206).count();
    assert_eq!(ranges, 6, "the large blob was not read as six ranges");
    assert_eq!(moto.keys().len(), 2, "the refill uploaded again");
}

/// Pulls `blobs` (each fetched from the upstream once before) through `node`, an empty node: no upstream
/// request, and the bucket read for every byte exactly once.
async fn refills_from_the_bucket(fake: &FakeUpstream, node: &Wharf, blobs: &[(String, bytes::Bytes)]) {
    for (digest, data) in blobs {
        get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", node.url()), data).await;
        assert_eq!(fake.blob_gets(digest), 1, "the empty node went to the upstream for {digest}");
    }
    let read: usize = blobs.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(node.metric("wharf_bucket_bytes_total{reason=\"read\"}").await, read as f64);
}

/// `[storage.s3]` extra keys that make wharf fetch each blob as one stream, so a gate holds the whole fill.
const ONE_STREAM: &str = "\n[upstream]\nfill_concurrency = 1\n";

#[tokio::test(flavor = "multi_thread")]
async fn the_upload_runs_alongside_the_fill_and_completes_after_verification() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(24 * MIB + 7);
    // Held after two and a half 8 MiB parts.
    let gate = fake.gate(&digest, 20 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args_with(dir.path(), ONE_STREAM));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let pull = tokio::spawn({
        let data = data.clone();
        async move { get_ok(&client(), &url, &data).await }
    });
    gate.wait_reached().await;
    // While the upstream holds the rest: parts are up, the object does not exist yet.
    eventually("two parts are uploaded while the fill waits", || moto.parts_in_progress() >= 2).await;
    assert!(!moto.keys().contains(&key(&digest)), "the upload completed before the blob was verified");
    gate.release();
    pull.await.unwrap();
    eventually("the upload is completed", || moto.keys().contains(&key(&digest))).await;
    assert_eq!(moto.unfinished_uploads(), 0);
    assert_eq!(moto.object(&key(&digest)), data.to_vec());
    assert_eq!(wharf.metric("wharf_bucket_bytes_total{reason=\"written\"}").await, data.len() as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_fails_verification_never_completes_its_upload() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    let (digest, _) = fake.add_random_blob(20 * MIB);
    fake.wrong_bytes(&digest, true);
    let gate = fake.gate(&digest, 18 * MIB);
    let (good, good_data) = fake.add_random_blob(1000);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args_with(dir.path(), ONE_STREAM));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let pull = tokio::spawn(async move { fetch(&client(), &url, &[]).await });
    gate.wait_reached().await;
    // The upload is under way with the (not yet known to be wrong) bytes.
    eventually("two parts are uploaded while the fill waits", || moto.parts_in_progress() >= 2).await;
    gate.release();
    let wrong = pull.await.unwrap();
    assert!(!matches!(wrong, Outcome::Complete(200, _, _)), "a wrong blob was served complete");
    eventually("the upload is aborted", || moto.unfinished_uploads() == 0).await;
    // A good blob afterwards: once it is in the bucket, the bad one would have been too.
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{good}", wharf.url()), &good_data).await;
    eventually("the good blob is in the bucket", || moto.keys().contains(&key(&good))).await;
    assert_eq!(moto.keys(), vec![key(&good)], "bytes that failed verification reached the bucket");
    assert_eq!(moto.unfinished_uploads(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_object_is_not_committed_nor_read_again_and_is_replaced() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(3 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args(dir.path()));
    let first = Wharf::start(&dir.path().join("first"), &args);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", first.url()), &data).await;
    eventually("the blob is in the bucket", || moto.keys().contains(&key(&digest))).await;
    drop(first);
    // The bucket's copy goes bad.
    let mut bad = data.to_vec();
    bad[MIB] ^= 0xff;
    moto.put(&key(&digest), &bad);

    let second = Wharf::start(&dir.path().join("second"), &args);
    let url = format!("{}/v2/test/app/blobs/{digest}", second.url());
    let answer = fetch(&client(), &url, &[]).await;
    assert!(
        !matches!(&answer, Outcome::Complete(200, _, body) if *body != data),
        "the bucket's wrong bytes were served complete"
    );
    assert_eq!(second.metric("wharf_bucket_requests_total{reason=\"corrupt\"}").await, 1.0);
    // Fetched again from the upstream at once, verified, committed, and the bucket's copy replaced.
    let committed = crate::support::fake_upstream::blob_path(&second.data_dir, &digest);
    eventually("the blob is committed from the upstream", || committed.exists()).await;
    assert_eq!(sha256_digest(&std::fs::read(&committed).unwrap()), digest);
    assert_eq!(fake.blob_gets(&digest), 2, "one fetch by each node");
    eventually("the bucket's copy is replaced", || moto.object(&key(&digest)) == data.to_vec()).await;
    get_ok(&client(), &url, &data).await;
    let read_before = second.metric("wharf_bucket_bytes_total{reason=\"read\"}").await;
    assert!(read_before <= data.len() as f64, "the corrupt object was read more than once: {read_before}");
    assert_eq!(moto.unfinished_uploads(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_is_down_costs_little_and_is_used_again_when_back() {
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let port = moto.port();
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args_with(dir.path(), "breaker_seconds = 2\n"));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    drop(moto);
    // Down: the pull comes from the upstream, a few seconds late at most, and the breaker opens.
    let (digest, data) = fake.add_random_blob(MIB);
    let started = Instant::now();
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "a pull took {took:?} with the bucket down");
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 1.0);
    assert!(wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await >= 1.0);
    assert!(wharf.metric("wharf_bucket_errors_total{reason=\"unavailable\"}").await >= 1.0);
    // While open, the bucket is not asked at all.
    let errors = wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await;
    let (other, other_data) = fake.add_random_blob(1000);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{other}", wharf.url()), &other_data).await;
    assert_eq!(wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await, errors);
    // Back (an empty bucket): once the breaker has closed (2 s), a new blob goes to the bucket again.
    let moto = tokio::task::spawn_blocking(move || Moto::start_on(port)).await.unwrap();
    pull_until_shared(&fake, &wharf, |k| moto.keys().contains(&k.to_owned())).await;
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 0.0);
}

/// Pulls new blobs through `wharf` until one lands in the bucket (`present(key)`): the bucket is used again.
/// Panics after 30 s.
async fn pull_until_shared(fake: &FakeUpstream, wharf: &Wharf, present: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (digest, data) = fake.add_random_blob(1000);
        get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
        let uploaded = Instant::now() + Duration::from_secs(2);
        while Instant::now() < uploaded && !present(&key(&digest)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if present(&key(&digest)) {
            return;
        }
        assert!(Instant::now() < deadline, "the bucket was not used again within 30 s of coming back");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_by_digest_go_to_the_bucket_with_their_media_type_and_tags_do_not() {
    use crate::support::images::OCI_MANIFEST;
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    // Odd spacing: the bytes must come back exact.
    let body = format!("{{ \"schemaVersion\": 2,\n  \"mediaType\": \"{OCI_MANIFEST}\",  \"layers\": [] }}");
    let digest = fake.put_manifest("test/app", "v1", OCI_MANIFEST, body.clone());
    let object = format!("manifests/sha256/{}", digest.strip_prefix("sha256:").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(moto.wharf_args(dir.path()));
    let first = Wharf::start(&dir.path().join("first"), &args);
    let http = client();
    let got = http.get(format!("{}/v2/test/app/manifests/v1", first.url())).send().await.unwrap();
    assert_eq!(got.status(), 200);
    eventually("the manifest is in the bucket", || moto.keys().contains(&object)).await;
    assert_eq!(moto.object(&object), body.as_bytes());
    assert_eq!(moto.content_type(&object).as_deref(), Some(OCI_MANIFEST));
    assert_eq!(moto.keys(), vec![object.clone()], "something other than the manifest by digest went to the bucket");
    drop(first);

    // An empty node resolves the tag with a HEAD (the upstream keeps the tag's freshness) and takes the body
    // by digest from the bucket: no manifest GET reaches the upstream.
    let gets = fake.manifest_gets();
    let second = Wharf::start(&dir.path().join("second"), &args);
    let head = http.head(format!("{}/v2/test/app/manifests/v1", second.url())).send().await.unwrap();
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
    let got = http.get(format!("{}/v2/test/app/manifests/{digest}", second.url())).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], OCI_MANIFEST);
    assert_eq!(got.bytes().await.unwrap(), body.as_bytes());
    assert_eq!(fake.manifest_gets(), gets, "the empty node asked the upstream for the manifest's body");
    assert_eq!(second.metric("wharf_bucket_requests_total{reason=\"hit\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_the_bucket_cannot_keep_up_with_is_abandoned_without_delaying_the_pull() {
    use crate::support::fake_s3::FakeS3;
    let s3 = FakeS3::start().await;
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(20 * MIB);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    // The part bound at 2 s; the breaker and every other bound as configured by default.
    args.extend(s3.wharf_args(dir.path(), &format!("part_timeout_seconds = 2\n{ONE_STREAM}")));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    // The whole blob reaches the client while the bucket holds the upload's parts unanswered.
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    s3.part_reached().await;
    // Then the upload is given up, counted and aborted; the breaker opens.
    let abandoned = async {
        while wharf.metric("wharf_bucket_uploads_abandoned_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), abandoned).await.expect("the stuck upload was never abandoned");
    eventually("the upload is aborted", || s3.aborts() == 1).await;
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 1.0);
    assert_eq!(wharf.metric("wharf_bucket_errors_total{reason=\"timeout\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_read_that_breaks_part_way_is_resumed_from_the_upstream_and_opens_the_breaker() {
    use crate::support::fake_s3::FakeS3;
    let s3 = FakeS3::start().await;
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(20 * MIB);
    s3.put(&key(&digest), data.clone());
    s3.break_at(10 * MIB as u64 + 123);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    // 4 MiB ranges, two at once: the bucket's ranged path, as for any large blob.
    args.extend(s3.wharf_args(dir.path(), "[upstream]\nfill_chunk_size = 4194304\nfill_concurrency = 2\n"));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    // The upstream was asked only for the rest, from where the bucket's contiguous bytes ended.
    let ranges = fake.blob_ranges(&digest);
    let [Some(range)] = ranges.as_slice() else { panic!("the upstream was asked {ranges:?}, not one range") };
    let from: u64 = range.strip_prefix("bytes=").unwrap().split('-').next().unwrap().parse().unwrap();
    assert!(from > 0, "the blob was fetched again from its first byte");
    assert!(wharf.metric("wharf_bucket_bytes_total{reason=\"read\"}").await >= from as f64);
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 1.0);
    let committed = crate::support::fake_upstream::blob_path(&wharf.data_dir, &digest);
    eventually("the blob is committed", || committed.exists()).await;
    assert_eq!(sha256_digest(&std::fs::read(&committed).unwrap()), digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_does_not_answer_costs_one_pull_its_bound_then_is_skipped() {
    use crate::support::fake_s3::FakeS3;
    let s3 = FakeS3::start().await;
    s3.go_silent();
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(MIB);
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.extend(s3.wharf_args(dir.path(), ""));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    // The bucket's silence is cut by its 5 s bound; the request's own deadline (120 s) and the client's
    // (30 s here) are far away.
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let pulled = tokio::time::timeout(Duration::from_secs(30), get_ok(&client(), &url, &data)).await;
    assert!(pulled.is_ok(), "a bucket that does not answer held the pull");
    assert_eq!(fake.blob_gets(&digest), 1);
    assert_eq!(wharf.metric("wharf_bucket_errors_total{reason=\"timeout\"}").await, 1.0);
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 1.0);
    // Skipped while the breaker is open: the next pull does not wait for the bucket again.
    let (other, other_data) = fake.add_random_blob(1000);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{other}", wharf.url()), &other_data).await;
    assert_eq!(wharf.metric("wharf_bucket_errors_total{reason=\"timeout\"}").await, 1.0);
}

// Against s3s-fs: a file-backed server that checks signatures.

const SECRET: &str = "wharf-test-secret-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn the_bucket_outlives_its_servers_restart_and_refills_an_empty_node() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    let s3 = S3sFs::launch(&root, 0, SECRET).await;
    let fake = FakeUpstream::start().await;
    let blobs = [fake.add_random_blob(20 * MIB + 5), fake.add_random_blob(1000)];
    let mut args = fake.wharf_args();
    args.extend(s3.wharf_args(dir.path(), SECRET, ""));
    let first = Wharf::start(&dir.path().join("first"), &args);
    for (digest, data) in &blobs {
        get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", first.url()), data).await;
    }
    for (digest, data) in &blobs {
        eventually("the blob is in the bucket", || s3.object(&key(digest)).as_deref() == Some(&data[..])).await;
    }
    drop(first);
    drop(s3);

    // The server restarts (another port) over the same files; a node with an empty disk refills from it.
    let s3 = S3sFs::launch(&root, 0, SECRET).await;
    let config = dir.path().join("second-config");
    std::fs::create_dir_all(&config).unwrap();
    let mut args = fake.wharf_args();
    args.extend(s3.wharf_args(&config, SECRET, ""));
    let second = Wharf::start(&dir.path().join("second"), &args);
    refills_from_the_bucket(&fake, &second, &blobs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_open_the_breaker_and_the_bucket_is_used_once_they_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("s3");
    let s3 = S3sFs::launch(&root, 0, SECRET).await;
    let port = s3.port();
    let fake = FakeUpstream::start().await;
    // wharf signs with a secret the server does not know: every request is refused (403).
    let wrong = "not-the-secret-the-server-knows";
    let mut args = fake.wharf_args();
    args.extend(s3.wharf_args(dir.path(), wrong, "breaker_seconds = 2\n"));
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let (digest, data) = fake.add_random_blob(MIB);
    let started = Instant::now();
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "a pull took {took:?} with the credentials refused");
    assert_eq!(fake.blob_gets(&digest), 1);
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 1.0);
    assert!(wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await >= 1.0);
    assert!(wharf.metric("wharf_bucket_errors_total{reason=\"denied\"}").await >= 1.0);
    assert_eq!(s3.object(&key(&digest)), None, "an upload went through with refused credentials");
    // While open, the bucket is not asked at all.
    let errors = wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await;
    let (other, other_data) = fake.add_random_blob(1000);
    get_ok(&client(), &format!("{}/v2/test/app/blobs/{other}", wharf.url()), &other_data).await;
    assert_eq!(wharf.metric("wharf_bucket_requests_total{reason=\"error\"}").await, errors);

    // The server comes to accept wharf's secret (a rotated key reaching it): the bucket is used again.
    drop(s3);
    let s3 = S3sFs::launch(&root, port, wrong).await;
    pull_until_shared(&fake, &wharf, |k| s3.object(k).is_some()).await;
    assert_eq!(wharf.metric("wharf_bucket_breaker_open").await, 0.0);
}

// With the cluster tier.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_cluster_refills_from_the_bucket_with_no_upstream_bytes() {
    use crate::support::cluster::{Cluster, peer_args, start_node};
    let moto = tokio::task::spawn_blocking(Moto::start).await.unwrap();
    let fake = FakeUpstream::start().await;
    let blobs = [fake.add_random_blob(12 * MIB + 3), fake.add_random_blob(5 * MIB), fake.add_random_blob(1000)];
    let total: usize = blobs.iter().map(|(_, d)| d.len()).sum();
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    // One GET per blob from the upstream, so that its request count is its byte count.
    args.extend(moto.wharf_args_with(dir.path(), ONE_STREAM));
    let mut cluster = Cluster::start(3, &args, true);
    let herd = |cluster: &Cluster| {
        let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
        let blobs = blobs.clone();
        async move {
            let mut pulls = Vec::new();
            for i in 0..9 {
                for (digest, data) in blobs.clone() {
                    let url = format!("{}/v2/test/app/blobs/{digest}", urls[i % 3]);
                    pulls.push(tokio::spawn(async move { get_ok(&client(), &url, &data).await }));
                }
            }
            for p in pulls {
                p.await.unwrap();
            }
        }
    };
    herd(&cluster).await;
    for (digest, _) in &blobs {
        assert_eq!(fake.blob_gets(digest), 1, "the cluster fetched {digest} from the upstream more than once");
    }
    eventually("every blob is in the bucket", || blobs.iter().all(|(d, _)| moto.keys().contains(&key(d)))).await;
    let mut written = 0.0;
    for node in &cluster.nodes {
        written += node.wharf.metric("wharf_bucket_bytes_total{reason=\"written\"}").await;
    }
    assert_eq!(written, total as f64, "a blob was uploaded by more than its owner");
    assert_eq!(moto.unfinished_uploads(), 0);
    let before: Vec<usize> = blobs.iter().map(|(d, _)| moto.gets(&key(d)).len()).collect();

    // Every node's disk wiped (new data directories, the same peer addresses), and the herd again.
    let peers = cluster.peers.clone();
    let nodes: Vec<_> = cluster.nodes.drain(..).collect();
    drop(nodes);
    for (i, peer) in peers.iter().enumerate() {
        let mut all = args.clone();
        all.extend(peer_args(peer, &peers, &cluster.key_file));
        cluster.nodes.push(start_node(peer, &cluster.dir.path().join(format!("wiped{i}")), &all));
    }
    herd(&cluster).await;
    for (digest, _) in &blobs {
        assert_eq!(fake.blob_gets(digest), 1, "the wiped cluster went to the upstream for {digest}");
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        let read = node.wharf.metric("wharf_bucket_bytes_total{reason=\"read\"}").await;
        assert!(read <= total as f64, "node {i} read {read} bytes from the bucket, more than every blob once");
    }
    for ((digest, _), before) in blobs.iter().zip(before) {
        let reads = moto.gets(&key(digest)).len() - before;
        assert!((1..=3).contains(&reads), "{digest} was read from the bucket {reads} times by three nodes");
    }
}
