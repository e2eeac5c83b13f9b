//! The cluster tier with real processes on loopback: three wharf instances on 127.0.0.2–4, each with its own
//! data directory, a real or fake upstream, and clients spread over the nodes.
//!
//! Upstream traffic is counted where it happens: the real `docker-registry`'s access log (bytes sent per
//! request) or the fake upstream's request log (for fault injection: a fill held half way by a gate).

use crate::support::cluster::{Cluster, KEY, free_port, key_file, owner_of, peer_args, start_node};
use crate::support::fake_upstream::{FakeUpstream, Outcome, REGISTRY, blob_path, client, fetch, spawn_fetch};
use crate::support::images::sha256_file;
use crate::support::registry::shared;
use sha2::{Digest as _, Sha256};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// Polls an async condition every 20 ms; panics naming `what` after `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GETs `url` and hashes the body as it streams (no whole blob in memory): `(status, digest, length)`.
async fn hash_get(client: &reqwest::Client, url: &str, extra: &[(&str, &str)]) -> Result<(u16, String, u64), String> {
    let mut req = client.get(url);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let mut resp = req.send().await.map_err(|e| format!("GET {url}: {e:?}"))?;
    let status = resp.status().as_u16();
    let (mut hasher, mut len) = (Sha256::new(), 0u64);
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {url}: body broke after {len} bytes: {e:?}"))? {
        hasher.update(&chunk);
        len += chunk.len() as u64;
    }
    Ok((status, format!("sha256:{}", hex::encode(hasher.finalize())), len))
}

/// A three-node cluster (or three independent instances) in front of the real registry; 16 clients spread
/// over the nodes pull the image with the 256 MiB layer at the same moment. Returns the upstream bytes sent
/// per blob, as multiples of the blob's size.
async fn herd(clustered: bool) -> Vec<(String, f64)> {
    let seeded = shared();
    let image = seeded.alias("test/big");
    let args = vec![
        "--upstream".to_string(),
        format!("registry.test={}", seeded.registry.url()),
        "--default-registry".into(),
        "registry.test".into(),
    ];
    let cluster = Cluster::start(3, &args, clustered);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut clients = Vec::new();
    for i in 0..16 {
        let base = format!("{}/v2/{}", cluster.nodes[i % 3].url(), image.repo);
        let (image, barrier) = (image.clone(), barrier.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            barrier.wait().await;
            let accept =
                ("Accept", "application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json");
            let (status, digest, _) = hash_get(&c, &format!("{base}/manifests/{}", image.tag), &[accept]).await?;
            if status != 200 || digest != image.manifest_digest {
                return Err(format!("client {i}: manifest {status} {digest}"));
            }
            for (blob, size) in &image.blobs {
                let (status, digest, len) = hash_get(&c, &format!("{base}/blobs/{blob}"), &[]).await?;
                if status != 200 || &digest != blob || len != *size {
                    return Err(format!("client {i}: blob {blob}: {status}, {len} bytes hashing to {digest}"));
                }
            }
            Ok(())
        }));
    }
    for (i, c) in clients.into_iter().enumerate() {
        let done = tokio::time::timeout(Duration::from_secs(240), c).await;
        done.unwrap_or_else(|_| panic!("client {i} did not finish within 240 s")).unwrap().unwrap();
    }
    image
        .blobs
        .iter()
        .map(|(blob, size)| {
            let sent = seeded.registry.bytes_sent(&format!("/v2/{}/blobs/{blob}", image.repo));
            (blob.clone(), sent as f64 / *size as f64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_herd_over_three_nodes_takes_each_blob_from_the_upstream_once() {
    let clustered = herd(true).await;
    for (blob, ratio) in &clustered {
        assert!((ratio - 1.0).abs() < 1e-9, "with the cluster, the upstream sent {ratio:.3}× blob {blob}");
    }
    // The same herd against three independent instances: each node fetches every blob itself.
    let islands = herd(false).await;
    for (blob, ratio) in &islands {
        assert!((ratio - 3.0).abs() < 1e-9, "without the cluster, the upstream sent {ratio:.3}× blob {blob}");
    }
}

/// Three nodes in front of a fake upstream; `extra_toml` goes into each node's config file.
fn fake_cluster(fake: &FakeUpstream, extra_toml: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    // One stream per blob (no parallel ranges): a gate on the blob then holds the whole fill half way.
    std::fs::write(&config, format!("[upstream]\nfill_concurrency = 1\n{extra_toml}")).unwrap();
    let mut args = fake.wharf_args();
    args.extend(["--config".to_string(), config.display().to_string()]);
    let cluster = Cluster::start(3, &args, true);
    std::mem::forget(dir); // the config must outlive the nodes (restarts read it again)
    cluster
}

async fn peer_bytes_in(cluster: &Cluster, node: usize) -> f64 {
    cluster.nodes[node].wharf.metric("wharf_peer_bytes_total{direction=\"in\"}").await
}

/// Upstream bytes the fake upstream was asked for `digest` (each GET's range, or the whole blob).
fn upstream_bytes(fake: &FakeUpstream, digest: &str, size: u64) -> u64 {
    fake.blob_ranges(digest)
        .into_iter()
        .map(|r| match r.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            None => size,
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                let a: u64 = a.parse().unwrap();
                let b: u64 = if b.is_empty() { size - 1 } else { b.parse::<u64>().unwrap().min(size - 1) };
                b + 1 - a
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_joiner_on_another_node_streams_from_the_owners_fill() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(8 * MIB);
    let gate = fake.gate(&digest, 4 * MIB);
    let cluster = fake_cluster(&fake, "");
    let owner = cluster.owner(&digest);
    let edges: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let c = client();
    let first = spawn_fetch(&c, &format!("{}/v2/test/app/blobs/{digest}", cluster.nodes[edges[0]].url()), &[]).0;
    gate.wait_reached().await;
    // The late joiner asks the other non-owner while the owner's fill is held half way.
    let started = Instant::now();
    let mut late = c.get(format!("{}/v2/test/app/blobs/{digest}", cluster.nodes[edges[1]].url())).send().await.unwrap();
    assert_eq!(late.status(), 200);
    let chunk = tokio::time::timeout(Duration::from_secs(10), late.chunk()).await.expect("no first byte within 10 s");
    let chunk = chunk.unwrap().expect("a first chunk");
    assert!(!gate.is_released(), "the first bytes came from the owner's fill in progress");
    assert_eq!(&chunk[..], &data[..chunk.len()]);
    println!("late joiner: first byte after {:?}", started.elapsed());
    assert_eq!(fake.blob_gets(&digest), 1, "the late joiner caused a new upstream request");
    gate.release();
    let mut rest = chunk.to_vec();
    while let Some(more) = late.chunk().await.unwrap() {
        rest.extend_from_slice(&more);
    }
    assert!(rest == data, "late joiner: wrong bytes");
    match first.await.unwrap() {
        Outcome::Complete(200, _, body) => assert!(body == data, "first client: wrong bytes"),
        other => panic!("first client: {other:?}"),
    }
    assert_eq!(fake.blob_gets(&digest), 1, "one upstream request for the whole cluster");
    for i in 0..3 {
        let path = blob_path(&cluster.nodes[i].wharf.data_dir, &digest);
        if path.is_file() {
            assert_eq!(sha256_file(&path), digest, "node {i} committed wrong bytes");
        }
    }
}

/// What a fault does to the owner in the middle of its fill.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Stop,
    Partition,
}

/// Removes an nft table on drop (a failed test must not leave loopback partitioned).
struct NftTable(&'static str);

impl NftTable {
    /// Drops every packet between address `a` and the peer listener `b` (`ip:port`), both ways, on loopback.
    /// The port keeps other tests' nodes on the same addresses out of it.
    fn partition(name: &'static str, a: &str, b: &str) -> NftTable {
        let (b, port) = b.rsplit_once(':').unwrap();
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", name]).output();
        let table = NftTable(name);
        let script = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0;\n  \
             ip saddr {a} ip daddr {b} tcp dport {port} drop\n  \
             ip saddr {b} ip daddr {a} tcp sport {port} drop\n }}\n}}\n"
        );
        let out = std::process::Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn();
        let mut child = out.expect("nft is needed for the partition test (scripts/test installs it)");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        drop(child.stdin.take());
        let status = child.wait().unwrap();
        assert!(status.success(), "nft refused the partition rules (needs root)");
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", self.0]).output();
    }
}

/// An 8 MiB blob whose upstream answer is held half way by a gate, three nodes (with `extra_toml`), and a
/// client on each non-owner streaming the blob; returns once the owner's fill has reached the gate.
struct HalfWay {
    fake: FakeUpstream,
    cluster: Cluster,
    digest: String,
    data: bytes::Bytes,
    gate: std::sync::Arc<crate::support::fake_upstream::Gate>,
    owner: usize,
    edges: Vec<usize>,
    fetches: Vec<tokio::task::JoinHandle<Outcome>>,
}

async fn half_way(extra_toml: &str) -> HalfWay {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(8 * MIB);
    let gate = fake.gate(&digest, 4 * MIB);
    let cluster = fake_cluster(&fake, extra_toml);
    let owner = cluster.owner(&digest);
    let edges: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let c = client();
    let fetches = edges
        .iter()
        .map(|e| spawn_fetch(&c, &format!("{}/v2/test/app/blobs/{digest}", cluster.nodes[*e].url()), &[]).0)
        .collect();
    gate.wait_reached().await;
    HalfWay { fake, cluster, digest, data, gate, owner, edges, fetches }
}

/// Two clients on the two non-owners stream a blob while the owner fills it; half way the owner suffers
/// `fault`. Every client must finish with the right bytes, from at most twice the blob's upstream bytes.
/// Returns the time from the fault to the last client's end.
async fn owner_fault(fault: Fault) -> Duration {
    let size = 8 * MIB;
    // Everything else far away: only the stall timeout decides when a stopped owner is given up.
    let HalfWay { fake, mut cluster, digest, data, gate, owner, edges, fetches } =
        half_way("[cluster]\nstall_timeout = 2\nsuspect_for = 600\n").await;
    // Both edges have the first half from the owner before the fault.
    for e in &edges {
        let e = *e;
        eventually("an edge has the owner's first half", Duration::from_secs(30), || {
            let cluster = &cluster;
            async move { peer_bytes_in(cluster, e).await >= (size / 2) as f64 }
        })
        .await;
    }
    let _partition;
    let at = Instant::now();
    match fault {
        Fault::Kill => cluster.nodes[owner].wharf.kill9(),
        Fault::Stop => cluster.nodes[owner].wharf.signal(libc::SIGSTOP),
        Fault::Partition => {
            _partition =
                NftTable::partition("wharf_it_partition", &cluster.nodes[edges[0]].ip, &cluster.nodes[owner].peer);
        }
    }
    gate.release();
    for (i, f) in fetches.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(60), f).await;
        match outcome.unwrap_or_else(|_| panic!("{fault:?}: client {i} still running 60 s after the fault")).unwrap() {
            Outcome::Complete(200, _, body) => assert!(body == data, "{fault:?}: client {i} got wrong bytes"),
            other => panic!("{fault:?}: client {i}: {other:?}"),
        }
    }
    let took = at.elapsed();
    if matches!(fault, Fault::Stop) {
        cluster.nodes[owner].wharf.signal(libc::SIGCONT);
    }
    let sent = upstream_bytes(&fake, &digest, size as u64);
    assert!(sent <= 2 * size as u64, "{fault:?}: upstream sent {sent} bytes for a {size}-byte blob");
    for e in &edges {
        let path = blob_path(&cluster.nodes[*e].wharf.data_dir, &digest);
        assert!(path.is_file(), "{fault:?}: node {e} did not commit the blob");
        assert_eq!(sha256_file(&path), digest, "{fault:?}: node {e} committed wrong bytes");
    }
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_killed_half_way_costs_the_others_nothing_but_a_resume() {
    owner_fault(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_owner_is_given_up_after_the_stall_timeout() {
    let took = owner_fault(Fault::Stop).await;
    // stall_timeout = 2 s, then a status probe bounded by 2 s: well within 2 + 2 + 8 s. Without the stall
    // watch the clients would wait on the stopped owner until the 60 s bound above.
    assert!(took < Duration::from_secs(12), "resumed {took:?} after the owner stopped");
    assert!(took >= Duration::from_millis(1900), "resumed after {took:?}: before the stall timeout?");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_between_an_edge_and_the_owner_is_resumed_elsewhere() {
    let took = owner_fault(Fault::Partition).await;
    assert!(took < Duration::from_secs(12), "resumed {took:?} after the partition");
}

/// A peer that answers every blob request with `body` (the right length, wrong bytes) and counts requests.
async fn lying_peer(addr: &str, body: Vec<u8>) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let body = bytes::Bytes::from(body);
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = body.clone();
        async move { ([("content-type", "application/octet-stream")], body) }
    });
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    asked
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_peer_poisons_nothing_and_is_skipped_afterwards() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let liar = format!("127.0.0.5:{}", free_port("127.0.0.5"));
    let edge = format!("127.0.0.6:{}", free_port("127.0.0.6"));
    let peers = vec![liar.clone(), edge.clone()];
    // A blob the liar owns, so the edge asks it first.
    let (digest, data) = loop {
        let (d, b) = fake.add_random_blob(2 * MIB);
        if owner_of(&peers, &d) == liar {
            break (d, b);
        }
    };
    let mut flipped = data.to_vec();
    flipped[MIB] ^= 0xff;
    let asked = lying_peer(&liar, flipped.clone()).await;
    let mut args = fake.wharf_args();
    args.extend(peer_args(&edge, &peers, &keys));
    let node = start_node(&edge, &dir.path().join("edge"), &args);
    let url = format!("{}/v2/test/app/blobs/{digest}", node.url());

    match fetch(&client(), &url, &[]).await {
        // The wrong bytes fail verification before the last byte: the client sees a broken body.
        Outcome::Broken(200, _) => {}
        Outcome::Complete(_, _, body) => panic!("a complete body from a lying peer (right bytes: {})", body == data),
        other => panic!("expected a broken body, got {other:?}"),
    }
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(node.wharf.metric("wharf_peer_corrupt_total").await, 1.0);
    // Nothing unverified is ever committed: the file that appears is the upstream's, fetched again at once.
    let committed = blob_path(&node.wharf.data_dir, &digest);
    eventually("the blob is fetched again from the upstream", Duration::from_secs(30), || async { committed.exists() })
        .await;
    assert_eq!(sha256_file(&committed), digest, "bytes that failed verification were committed");
    assert_eq!(fake.blob_gets(&digest), 1);

    // The retry a client makes finds it; the liar is not asked again.
    match fetch(&client(), &url, &[]).await {
        Outcome::Complete(200, _, body) => assert!(body == data, "the retry got wrong bytes"),
        other => panic!("the retry: {other:?}"),
    }
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "the liar was asked again");
    assert_eq!(fake.blob_gets(&digest), 1);
    assert_eq!(node.wharf.metric("wharf_peer_corrupt_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_api_refuses_unsigned_requests_before_any_upstream_work() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let keys = key_file(dir.path());
    let me = format!("127.0.0.7:{}", free_port("127.0.0.7"));
    let mut args = fake.wharf_args();
    args.extend(peer_args(&me, std::slice::from_ref(&me), &keys));
    let node = start_node(&me, &dir.path().join("node"), &args);
    let path = format!("/v2/test/app/blobs/{digest}?ns={REGISTRY}");
    let url = format!("http://{me}{path}");
    let signer = wharf::cluster::auth::Keys::from_strings(&[KEY]);
    let wrong = wharf::cluster::auth::Keys::from_strings(&["another-key-that-is-long-enough-0123456789"]);
    let now = wharf::cluster::auth::now();
    let sender = "127.0.0.9:5001";
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("unsigned", vec![]),
        ("no sender", vec![("x-wharf-peer-auth", signer.sign("GET", &path, now, sender))]),
        (
            "wrong key",
            vec![("x-wharf-peer", sender.into()), ("x-wharf-peer-auth", wrong.sign("GET", &path, now, sender))],
        ),
        (
            "old timestamp",
            vec![("x-wharf-peer", sender.into()), ("x-wharf-peer-auth", signer.sign("GET", &path, now - 120, sender))],
        ),
        (
            "another path",
            vec![
                ("x-wharf-peer", sender.into()),
                ("x-wharf-peer-auth", signer.sign("GET", "/v2/x/blobs/y", now, sender)),
            ],
        ),
        (
            "another sender",
            vec![
                ("x-wharf-peer", "127.0.0.8:5001".into()),
                ("x-wharf-peer-auth", signer.sign("GET", &path, now, sender)),
            ],
        ),
    ];
    for (what, headers) in &cases {
        let mut req = client().get(&url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{what}: {body}");
    }
    assert!(fake.requests().is_empty(), "a refused peer request reached the upstream: {:?}", fake.requests());
    // Signed: served (from the upstream, on this node's credentials).
    let resp = client()
        .get(&url)
        .header("x-wharf-peer", sender)
        .header("x-wharf-peer-auth", signer.sign("GET", &path, now, sender))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-wharf-source"], "upstream");
    assert!(resp.bytes().await.unwrap() == data);
    assert_eq!(fake.blob_gets(&digest), 1);
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn edges_keep_waiting_while_the_owner_waits_for_its_own_upstream() {
    let HalfWay { fake, cluster, digest, data, gate, edges, fetches, .. } =
        half_way("[cluster]\nstall_timeout = 1\n").await;
    // Each edge's stream has stalled twice, asked the owner, and been told its upstream is the slow part.
    for e in &edges {
        let node = &cluster.nodes[*e].wharf;
        eventually("an edge checked the owner's fill twice", Duration::from_secs(30), || async {
            node.log().matches("peer is waiting for its upstream").count() >= 2
        })
        .await;
    }
    assert_eq!(fake.blob_gets(&digest), 1, "an edge went to the upstream while the owner was only waiting for it");
    gate.release();
    for (i, f) in fetches.into_iter().enumerate() {
        match f.await.unwrap() {
            Outcome::Complete(200, _, body) => assert!(body == data, "client {i}: wrong bytes"),
            other => panic!("client {i}: {other:?}"),
        }
    }
    assert_eq!(fake.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn private_content_through_a_peer_gets_the_answer_a_single_node_gives() {
    use crate::support::fake_upstream::{Auth, basic};
    const TOKEN: &str = "team-token-0123456789abcdef";
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Bearer(Some(("alice".into(), "s3cret".into()))));
    up.set_public_repos(&["pub/app"]);
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("config.json");
    let auth = basic("alice", "s3cret").to_str().unwrap().trim_start_matches("Basic ").to_string();
    std::fs::write(&creds, serde_json::json!({"auths": {REGISTRY: {"auth": auth}}}).to_string()).unwrap();
    let config = dir.path().join("wharf.toml");
    let toml = format!("[[access.tokens]]\nname = \"team\"\ntoken = \"{TOKEN}\"\nread = [\"{REGISTRY}/team/*\"]\n");
    std::fs::write(&config, toml).unwrap();
    let mut args = up.wharf_args();
    args.extend(["--config", config.to_str().unwrap(), "--credentials", creds.to_str().unwrap()].map(String::from));
    let cluster = Cluster::start(2, &args, true);
    // A private blob owned by node 0: node 1 is the edge that must fetch it through the peer API.
    let (digest, data) = loop {
        let (d, b) = up.add_random_blob_in(&["team/app"], 300_000);
        if cluster.owner(&d) == 0 {
            break (d, b);
        }
    };
    let path = format!("/v2/team/app/blobs/{digest}");
    let answer = |node: usize, auth: Option<String>| {
        let url = format!("{}{path}", cluster.nodes[node].url());
        async move {
            let mut req = client().get(url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.bytes().await.unwrap();
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .map(|v| v["errors"][0]["code"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            (status, code, body)
        }
    };
    // Anonymous, and with a token for another repository's pattern: refused at the edge as at the owner.
    for auth in [None, Some("Bearer not-a-known-token-000000".to_owned())] {
        let (edge, owner) = (answer(1, auth.clone()).await, answer(0, auth.clone()).await);
        assert_eq!((edge.0, &edge.1), (owner.0, &owner.1), "auth {auth:?}: edge and owner answer differently");
        assert_eq!(edge.0, 401, "auth {auth:?}");
    }
    assert_eq!(cluster.nodes[1].wharf.metric("wharf_peer_bytes_total{direction=\"in\"}").await, 0.0);
    // With the token: served through the peer, the same bytes.
    let via_edge = answer(1, Some(format!("Bearer {TOKEN}"))).await;
    assert_eq!(via_edge.0, 200);
    assert!(via_edge.2 == data, "wrong bytes through the peer");
    assert_eq!(
        cluster.nodes[1].wharf.metric("wharf_peer_bytes_total{direction=\"in\"}").await,
        data.len() as f64,
        "the edge did not take the private blob from its owner"
    );
    let direct = answer(0, Some(format!("Bearer {TOKEN}"))).await;
    assert_eq!((direct.0, direct.2 == data), (200, true));
}

#[test]
fn containerd_and_skopeo_through_different_nodes_take_each_blob_from_the_upstream_once() {
    use crate::support::containerd::{Containerd, write_hosts_dir};
    use crate::support::images::{run_ok, skopeo};
    let seeded = shared();
    let image = seeded.alias("test/multi");
    let args = vec!["--upstream".to_string(), format!("registry.test={}", seeded.registry.url())];
    let cluster = Cluster::start(3, &args, true);
    let reference = format!("registry.test/{}", image.reference());
    // containerd through node 0 (its hosts.toml names node 0 only; it adds `?ns=registry.test`).
    let hosts = cluster.dir.path().join("hosts");
    write_hosts_dir(&hosts, "registry.test", &cluster.nodes[0].url());
    let ctd = Containerd::start();
    ctd.fetch_ok(&hosts, &reference);
    let store = ctd.content_digests();
    let missing: Vec<_> = image.all_digests().into_iter().filter(|d| !store.contains(d)).collect();
    assert!(missing.is_empty(), "not in containerd's content store: {missing:?}");
    // skopeo through the other two, by path prefix.
    for node in &cluster.nodes[1..] {
        let out = cluster.dir.path().join(format!("oci-{}", node.ip));
        let source = format!("docker://{}/registry.test/{}:{}", node.wharf.addr, image.repo, image.tag);
        let mut cmd = skopeo();
        cmd.args(["copy", "--all", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]);
        run_ok(cmd.arg(&source).arg(format!("oci:{}:{}", out.display(), image.tag)), Duration::from_secs(120));
        crate::skopeo::check_layout(&out, &image, &source);
    }
    for (blob, size) in &image.blobs {
        let sent = seeded.registry.bytes_sent(&format!("/v2/{}/blobs/{blob}", image.repo));
        assert_eq!(sent, *size, "blob {blob}: the upstream sent {sent} bytes for {size}");
    }
    // Manifests by digest: at most twice for the whole cluster. The digest's owner fetches it once; the
    // tag's owner, asked by a peer for the tag's body when it learnt the tag by a HEAD alone, fetches the
    // body itself, since a peer's request is never passed on (so never more than two).
    for m in &image.manifests {
        let gets = seeded.registry.count("GET", &format!("/v2/{}/manifests/{}", image.repo, m.digest));
        assert!(gets <= 2, "manifest {}: {gets} upstream GETs", m.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owner_stopped_before_it_answers_is_given_up_after_the_stall_timeout() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(MIB);
    let mut cluster = fake_cluster(&fake, "[cluster]\nstall_timeout = 2\nsuspect_for = 600\n");
    let owner = cluster.owner(&digest);
    let edge = (owner + 1) % 3;
    // Stopped, its kernel still accepts connections: the request goes out and no answer comes.
    cluster.nodes[owner].wharf.signal(libc::SIGSTOP);
    let started = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        fetch(&client(), &format!("{}/v2/test/app/blobs/{digest}", cluster.nodes[edge].url()), &[]),
    )
    .await;
    let took = started.elapsed();
    cluster.nodes[owner].wharf.signal(libc::SIGCONT);
    match got.expect("the edge still waits for the stopped owner after 60 s") {
        Outcome::Complete(200, _, body) => assert!(body == data, "wrong bytes"),
        other => panic!("{other:?}"),
    }
    // stall_timeout = 2 s plus a status probe bounded by 2 s (and perhaps the fallback peer's own wait).
    assert!(took < Duration::from_secs(12), "answered {took:?} after asking a stopped owner");
    cluster.nodes.remove(owner).wharf.kill9();
}
