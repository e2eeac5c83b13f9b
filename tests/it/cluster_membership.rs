//! The cluster when membership is not a fixed, shared list: tags revalidated once per cluster, nodes whose
//! views disagree, a view that follows a real DNS server, and a rolling restart under a pulling client.
//! Three wharf instances on 127.0.0.2–4 (see `support::cluster`).

use crate::support::cluster::{self, Cluster, Node, owner_of, peer_args, start_node};
use crate::support::fake_upstream::{
    FakeUpstream, Outcome, REGISTRY, REPO, client, fetch, get_ok, headers_of, random_bytes, sha256_digest, spawn_fetch,
};
use crate::support::images::{OCI_MANIFEST, TestImage, sha256};
use crate::support::registry::{shared, spawn_tied};
use crate::support::wharf::Wharf;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PEER_BYTES_IN: &str = "wharf_peer_bytes_total{direction=\"in\"}";

/// `s` without ANSI colour sequences (wharf colours its log even into a pipe).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One request a node's peer API answered, from its `peer request` log line.
#[derive(Debug)]
struct PeerRequest {
    sender: String,
    path: String,
    status: u16,
    source: String,
}

/// The value of `key=` in a log line (quotes dropped).
fn field(line: &str, key: &str) -> Option<String> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let value: String = line[at..].chars().take_while(|c| !c.is_whitespace()).collect();
    Some(value.trim_matches('"').to_owned())
}

/// Every peer request `wharf` answered so far.
fn peer_requests(wharf: &Wharf) -> Vec<PeerRequest> {
    strip_ansi(&wharf.log())
        .lines()
        .filter(|l| l.contains("wharf::peer") && l.contains("peer request") && !l.contains("refused"))
        .map(|l| PeerRequest {
            sender: field(l, "peer").unwrap_or_default(),
            path: field(l, "path").unwrap_or_default(),
            status: field(l, "status").and_then(|s| s.parse().ok()).unwrap_or(0),
            source: field(l, "source").unwrap_or_default(),
        })
        .collect()
}

/// Polls `wharf`'s metric `name` until `want` holds (30 s at most).
async fn wait_metric(wharf: &Wharf, name: &str, what: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = wharf.metric(name).await;
        if want(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {name} is still {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sleeps into the next whole second (and 50 ms more): a tag checked before this call is past a 1 s
/// freshness window afterwards (wharf stamps checks in whole seconds), and the round that follows has most
/// of a second before the owner's fresh answer itself goes stale.
async fn let_one_second_pass() {
    let into = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_millis() as u64;
    tokio::time::sleep(Duration::from_millis(1000 - into + 50)).await;
}

/// Upstream manifest requests (HEAD, GET) of a round where all three nodes HEAD, then of a round where all
/// three GET, the tag past its freshness window each time.
async fn stale_tag_rounds(clustered: bool) -> [usize; 2] {
    let up = FakeUpstream::start().await;
    let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    let digest = up.put_manifest(REPO, "v1", OCI_MANIFEST, manifest.clone());
    let mut args = up.wharf_args();
    args.extend(["--tag-ttl", "1"].map(String::from));
    let c = Cluster::start(3, &args, clustered);
    let http = client();
    let urls: Vec<String> = c.nodes.iter().map(|n| format!("{}/v2/{REPO}/manifests/v1", n.url())).collect();
    // Every node learns the tag (and caches its manifest).
    for url in &urls {
        let resp = http.get(url).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {url}");
        assert_eq!(resp.bytes().await.unwrap(), manifest.as_bytes());
    }
    let mut rounds = [0; 2];
    for (round, want_body) in [false, true].into_iter().enumerate() {
        let_one_second_pass().await;
        let before = up.manifest_heads() + up.manifest_gets();
        let asks: Vec<_> = urls
            .iter()
            .map(|url| {
                let req = if want_body { http.get(url) } else { http.head(url) };
                let req = req.header("accept", OCI_MANIFEST);
                tokio::spawn(async move {
                    let resp = req.send().await.expect("an answer");
                    let status = resp.status().as_u16();
                    let digest = resp.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_owned());
                    (status, digest, resp.bytes().await.expect("a body"))
                })
            })
            .collect();
        for (ask, url) in asks.into_iter().zip(&urls) {
            let (status, got, body) = tokio::time::timeout(Duration::from_secs(30), ask).await.unwrap().unwrap();
            assert_eq!((status, got.as_deref()), (200, Some(digest.as_str())), "{url} (GET: {want_body})");
            if want_body {
                assert_eq!(body, manifest.as_bytes(), "{url}");
            }
        }
        rounds[round] = up.manifest_heads() + up.manifest_gets() - before;
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_tag_asked_on_all_three_nodes_costs_one_upstream_request() {
    // The tag's owner revalidates it for the cluster; the others ask the owner.
    assert_eq!(stale_tag_rounds(true).await, [1, 1], "upstream manifest requests in the HEAD round, the GET round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_cluster_each_node_revalidates_a_stale_tag_itself() {
    // The control for the test above: the same rounds on three independent instances.
    assert_eq!(stale_tag_rounds(false).await, [3, 3], "upstream manifest requests in the HEAD round, the GET round");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_whose_views_disagree_fetch_a_blob_without_hanging_or_forwarding() {
    let up = FakeUpstream::start().await;
    let peers = cluster::addresses(3);
    let (a, b, c) = (&peers[0], &peers[1], &peers[2]);
    let views: Vec<Vec<String>> = vec![peers.clone(), peers.clone(), vec![b.clone(), c.clone()]];
    // A blob that A owns in the full view and B owns in C's view: C asks B while B gets it from A, so B must
    // answer C from the upstream or refuse, never pass C's request on to A.
    let (digest, data) = loop {
        let data = random_bytes(4 << 20);
        let digest = sha256_digest(&data);
        if owner_of(&peers, &digest) == *a && owner_of(&views[2], &digest) == *b {
            break (digest, data);
        }
    };
    up.add_blob(data.clone());
    let dir = tempfile::tempdir().unwrap();
    let key = cluster::key_file(dir.path());
    let nodes: Vec<Node> = peers
        .iter()
        .zip(&views)
        .enumerate()
        .map(|(i, (peer, view))| {
            let mut args = up.wharf_args();
            args.extend(peer_args(peer, view, &key));
            start_node(peer, &dir.path().join(format!("node{i}")), &args)
        })
        .collect();

    // All three clients are in flight together: the upstream holds every body after its first 64 KiB until
    // each client has its response headers. A and B first, so that B's fill comes from A when C asks B.
    let gate = up.gate(&digest, 64 << 10);
    let http = client();
    let url = |n: &Node| format!("{}/v2/{REPO}/blobs/{digest}", n.url());
    let mut tasks = Vec::new();
    for node in &nodes {
        let (task, headers) = spawn_fetch(&http, &url(node), &[]);
        let (status, _) = headers_of(&format!("GET through {}", node.peer), headers).await;
        assert_eq!(status, 200, "GET through {}", node.peer);
        tasks.push(task);
    }
    gate.release();
    for (task, node) in tasks.into_iter().zip(&nodes) {
        let outcome = tokio::time::timeout(Duration::from_secs(60), task).await;
        match outcome.unwrap_or_else(|_| panic!("GET through {} hung", node.peer)).unwrap() {
            Outcome::Complete(200, _, body) => assert!(body == data, "GET through {}: wrong bytes", node.peer),
            other => panic!("GET through {}: {other:?}", node.peer),
        }
    }
    let gets = up.blob_gets(&digest);
    assert!((1..=2).contains(&gets), "{gets} upstream GETs of the blob");

    let path = format!("/v2/{REPO}/blobs/{digest}");
    let received: Vec<Vec<PeerRequest>> = nodes.iter().map(|n| peer_requests(&n.wharf)).collect();
    for (node, requests) in nodes.iter().zip(&received) {
        for r in requests {
            let sender = peers.iter().position(|p| *p == r.sender);
            let sender = sender.unwrap_or_else(|| panic!("{} answered an unknown peer: {r:?}", node.peer));
            assert!(views[sender].contains(&node.peer), "{} asked {}, which is not in its view", r.sender, node.peer);
        }
    }
    // The disagreement played out: B asked A (its owner), C asked B (its owner), and C never asked A (above).
    assert!(received[0].iter().any(|r| r.sender == *b && r.path.starts_with(&path)), "A: {:?}", received[0]);
    let from_c: Vec<&PeerRequest> =
        received[1].iter().filter(|r| r.sender == *c && r.path.starts_with(&path)).collect();
    assert!(!from_c.is_empty(), "C never asked B: {:?}", received[1]);
    // No forwarding: B, whose own copy was coming from A, refused C rather than pass A's bytes on; C then
    // fetched the blob upstream itself.
    let refused = from_c.iter().all(|r| r.status == 503 && !matches!(r.source.as_str(), "fill" | "peer"));
    assert!(refused, "B answered C with bytes it was getting from A: {from_c:?}");
}

/// A running dnsmasq answering for the hosts files of one directory; killed on drop.
struct Dnsmasq {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq on 127.0.0.1 (a free port) with the hosts files in `hosts_dir`, answering with a TTL
    /// of one second and nothing but those names.
    fn start(hosts_dir: &Path, work: &Path) -> Dnsmasq {
        let bin = ["/usr/sbin/dnsmasq", "/sbin/dnsmasq"].into_iter().map(PathBuf::from).find(|p| p.is_file());
        let bin = bin.unwrap_or_else(|| crate::support::tools::require("dnsmasq"));
        let port = loop {
            // dnsmasq wants the port for both UDP and TCP.
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = tcp.local_addr().unwrap().port();
            if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        let log = work.join("dnsmasq.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--keep-in-foreground", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv"])
            .args(["--no-hosts", "--local-ttl=1", "--log-facility=-", "--user=root"])
            .arg(format!("--port={port}"))
            .arg(format!("--hostsdir={}", hosts_dir.display()))
            .arg(format!("--pid-file={}", work.join("dnsmasq.pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = spawn_tied(cmd).expect("spawn dnsmasq");
        Dnsmasq { child, port, log }
    }

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The A records dnsmasq gives for `name` (`None`: no answer at all).
    fn lookup(&self, name: &str) -> Option<Vec<[u8; 4]>> {
        let mut query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        sock.send_to(&query, self.addr()).ok()?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).ok()?;
        let answers = u16::from_be_bytes([buf[6], buf[7]]) as usize;
        // Every answer is a compressed name (2 bytes), type, class, TTL, length (10) and 4 address bytes.
        let mut at = query.len();
        let mut ips = Vec::new();
        for _ in 0..answers {
            let rd = at + 12;
            if rd + 4 > n {
                break;
            }
            ips.push([buf[rd], buf[rd + 1], buf[rd + 2], buf[rd + 3]]);
            at = rd + 4;
        }
        Some(ips)
    }

    /// Waits (10 s at most) until `name` resolves to `want` addresses.
    fn wait_for(&mut self, name: &str, want: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.lookup(name).is_some_and(|ips| ips.len() == want) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("dnsmasq exited ({status}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq never answered {want} records for {name}:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the hosts file that makes `name` resolve to `ips`, atomically (a rename into the watched
/// directory, so dnsmasq never reads half a file).
fn write_hosts(dir: &Path, name: &str, ips: &[&str]) {
    let text: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
    let tmp = dir.parent().unwrap().join("peers.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("peers")).unwrap();
}

/// A blob of `len` random bytes whose owner among `all` is `owner` and among `fewer` is `then`.
fn blob_owned(up: &FakeUpstream, all: &[String], owner: &str, fewer: &[String], then: &str) -> (String, bytes::Bytes) {
    loop {
        let data = random_bytes(256 << 10);
        let digest = sha256_digest(&data);
        if owner_of(all, &digest) == owner && owner_of(fewer, &digest) == then {
            up.add_blob(data.clone());
            return (digest, data);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_view_follows_a_real_dns_server() {
    const NAME: &str = "wharf-peers.test";
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    // The name gives addresses only: every node listens for peers on the same port.
    let port = loop {
        let port = cluster::free_port(ips[0]);
        if ips[1..].iter().all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok()) {
            break port;
        }
    };
    let peers: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
    let work = tempfile::Builder::new().prefix("wharf-dns-").tempdir().unwrap();
    let hosts = work.path().join("hosts");
    std::fs::create_dir(&hosts).unwrap();
    write_hosts(&hosts, NAME, &ips);
    let mut dns = Dnsmasq::start(&hosts, work.path());
    dns.wait_for(NAME, 3);

    let up = FakeUpstream::start().await;
    let key = cluster::key_file(work.path());
    let config = work.path().join("wharf.toml");
    std::fs::write(&config, "[cluster]\ndns_interval = 1\n").unwrap();
    let nodes: Vec<Node> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| {
            let mut args = up.wharf_args();
            args.extend(["--config".into(), config.display().to_string()]);
            args.extend(["--peer-listen".into(), peer.clone(), "--peer-key-file".into(), key.display().to_string()]);
            args.extend(["--peers-dns".into(), format!("{NAME}:{port}")]);
            args.extend(["--peer-dns-server".into(), dns.addr()]);
            start_node(peer, &work.path().join(format!("node{i}")), &args)
        })
        .collect();
    for n in &nodes {
        wait_metric(&n.wharf, "wharf_peers_ready", "the DNS name lists three nodes", |v| v == 3.0).await;
    }
    let http = client();
    let fetch_on = |node: &Node, digest: &str| format!("{}/v2/{REPO}/blobs/{digest}", node.url());
    let (first, second, gone) = (&nodes[0], &peers[1], &peers[2]);
    let two = &peers[..2];

    // Before: a blob the third node owns comes to the first from that owner.
    let (owned_by_gone, data) = blob_owned(&up, &peers, gone, two, &peers[0]);
    let bytes_in = first.wharf.metric(PEER_BYTES_IN).await;
    get_ok(&http, &fetch_on(first, &owned_by_gone), &data).await;
    let moved = first.wharf.metric(PEER_BYTES_IN).await - bytes_in;
    assert_eq!(moved, data.len() as f64, "the blob did not come from its owner {gone}");

    // The third node leaves the name (it keeps running: only the view can keep the others from it).
    let changes = first.wharf.metric("wharf_owner_changes_total").await;
    write_hosts(&hosts, NAME, &ips[..2]);
    dns.wait_for(NAME, 2);
    for n in &nodes[..2] {
        wait_metric(&n.wharf, "wharf_peers_ready", "the DNS name lost a node", |v| v == 2.0).await;
    }
    let after = first.wharf.metric("wharf_owner_changes_total").await;
    assert!(after > changes, "wharf_owner_changes_total stayed {after}");

    // After: a blob the third node owned is now the first's own, fetched from the upstream...
    let (was_gones, data) = blob_owned(&up, &peers, gone, two, &peers[0]);
    let bytes_in = first.wharf.metric(PEER_BYTES_IN).await;
    get_ok(&http, &fetch_on(first, &was_gones), &data).await;
    assert_eq!(first.wharf.metric(PEER_BYTES_IN).await, bytes_in, "bytes came from a peer");
    assert_eq!(up.blob_gets(&was_gones), 1, "the first node did not fetch it upstream itself");
    let asked_gone = peer_requests(&nodes[2].wharf).into_iter().filter(|r| r.path.contains(&was_gones)).count();
    assert_eq!(asked_gone, 0, "{gone} was asked after it left the view");
    // ...while a blob the second node owns still comes from it.
    let (seconds, data) = blob_owned(&up, &peers, second, two, second);
    let bytes_in = first.wharf.metric(PEER_BYTES_IN).await;
    get_ok(&http, &fetch_on(first, &seconds), &data).await;
    let moved = first.wharf.metric(PEER_BYTES_IN).await - bytes_in;
    assert_eq!(moved, data.len() as f64, "the blob did not come from its owner {second}");
}

/// Pulls `image` (tag, child manifests, every blob) through `url`, checking every digest.
async fn pull(http: &reqwest::Client, url: &str, image: &TestImage) -> Result<(), String> {
    let accept = [
        "application/vnd.oci.image.index.v1+json",
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
    .join(", ");
    let mut wanted: Vec<(String, String)> = Vec::new();
    wanted.push((format!("manifests/{}", image.tag), image.manifest_digest.clone()));
    wanted.extend(image.manifests.iter().skip(1).map(|m| (format!("manifests/{}", m.digest), m.digest.clone())));
    wanted.extend(image.blobs.iter().map(|(d, _)| (format!("blobs/{d}"), d.clone())));
    for (path, digest) in wanted {
        let full = format!("{url}/v2/{}/{path}", image.repo);
        match fetch(http, &full, &[("accept", &accept)]).await {
            Outcome::Complete(200, _, body) if sha256(&body) == digest => {}
            Outcome::Complete(200, _, body) => return Err(format!("GET {full}: wrong bytes ({})", sha256(&body))),
            other => return Err(format!("GET {full}: {other:?}")),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_fails_no_pull_and_keeps_the_cache() {
    let seeded = shared();
    let image = seeded.alias("test/multi");
    let registry = &seeded.registry;
    let mut args = vec!["--upstream".to_string(), format!("registry.test={}", registry.url())];
    args.extend(["--default-registry", "registry.test"].map(String::from));
    // Addresses where every node owns one of the image's blobs at least: each node's absence then matters.
    let peers = loop {
        let peers = cluster::addresses(3);
        let owners: std::collections::BTreeSet<String> = image.blobs.iter().map(|(d, _)| owner_of(&peers, d)).collect();
        if owners.len() == 3 {
            break peers;
        }
    };
    let dir = tempfile::Builder::new().prefix("wharf-rolling-").tempdir().unwrap();
    let key = cluster::key_file(dir.path());
    let start = |i: usize| {
        let mut all = args.clone();
        all.extend(peer_args(&peers[i], &peers, &key));
        start_node(&peers[i], &dir.path().join(format!("node{i}")), &all)
    };
    let mut nodes: Vec<Node> = (0..3).map(start).collect();
    let urls: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(nodes.iter().map(Node::url).collect()));
    // The client pulls in a loop through node `target` (none yet), counting pulls and keeping every failure;
    // `pulling` is held for each pull, so the test can pause the client while it stops a node.
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let pulling = Arc::new(tokio::sync::Mutex::new(()));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let puller = {
        let (urls, target, pulling, done, failures, stop, image) = (
            urls.clone(),
            target.clone(),
            pulling.clone(),
            done.clone(),
            failures.clone(),
            stop.clone(),
            image.clone(),
        );
        tokio::spawn(async move {
            let http = client();
            while !stop.is_cancelled() {
                let pull_guard = pulling.lock().await;
                let Some(url) = urls.lock().unwrap().get(target.load(Ordering::SeqCst)).cloned() else {
                    drop(pull_guard);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if let Err(e) = pull(&http, &url, &image).await {
                    failures.lock().unwrap().push(e);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Waits until a pull that started after this call has finished.
    let a_pull_after = |what: String| {
        let done = done.clone();
        async move {
            let from = done.load(Ordering::SeqCst) + 1;
            let deadline = Instant::now() + Duration::from_secs(120);
            while done.load(Ordering::SeqCst) <= from {
                assert!(Instant::now() < deadline, "no pull finished {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    for i in [0, 1, 2] {
        // Node i stops between two pulls; the pulls then go through the next node, whose cache is cold the
        // first time, so the blobs node i owns must come from elsewhere. (Blocking calls are fine here: the
        // test's own thread runs this, the puller runs on the workers.)
        let paused = pulling.lock().await;
        let status = nodes[i].wharf.terminate().expect("the node was running");
        assert!(status.success(), "node {i} exited with {status} on SIGTERM");
        target.store((i + 1) % 3, Ordering::SeqCst);
        drop(paused);
        a_pull_after(format!("while node {i} was down")).await;
        // Back on the same address and data directory.
        nodes[i] = start(i);
        urls.lock().unwrap()[i] = nodes[i].url();
        a_pull_after(format!("after node {i} came back")).await;
    }
    stop.cancel();
    puller.await.unwrap();
    let failures = failures.lock().unwrap().clone();
    let (failed, pulls) = (failures.len(), done.load(Ordering::SeqCst));
    assert!(failures.is_empty(), "{failed} of {pulls} pulls failed; the first ones: {:#?}", &failures[..failed.min(3)]);

    // Warm: a pull through any node costs no upstream blob bytes.
    let blobs = format!("/v2/{}/blobs/", image.repo);
    let before = registry.bytes_sent(&blobs);
    assert!(before > 0, "the image's blobs were never fetched upstream");
    let http = client();
    for node in &nodes {
        pull(&http, &node.url(), &image).await.unwrap_or_else(|e| panic!("warm pull through {}: {e}", node.peer));
    }
    assert_eq!(registry.bytes_sent(&blobs), before, "a warm pull fetched blob bytes upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_answer_from_the_owner_is_not_recorded_as_checked() {
    let up = FakeUpstream::start().await;
    let manifest = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    let digest = up.put_manifest(REPO, "v1", OCI_MANIFEST, manifest);
    let mut args = up.wharf_args();
    args.extend(["--tag-ttl", "1"].map(String::from));
    let c = Cluster::start(2, &args, true);
    let owner = c.owner(&format!("{REGISTRY}/{REPO}:v1"));
    let edge = 1 - owner;
    let http = client();
    let head = |node: usize| {
        let req = http.head(format!("{}/v2/{REPO}/manifests/v1", c.nodes[node].url())).header("accept", OCI_MANIFEST);
        async move {
            let resp = req.send().await.unwrap();
            let digest = resp.headers().get("docker-content-digest").map(|v| v.to_str().unwrap().to_owned());
            (resp.status().as_u16(), digest)
        }
    };
    // The owner knows the tag; then its upstream fails and the freshness window passes.
    assert_eq!(head(owner).await, (200, Some(digest.clone())));
    let_one_second_pass().await;
    up.fail_with(Some(503));
    // The edge asks the owner, which serves its last known answer.
    assert_eq!(head(edge).await, (200, Some(digest.clone())));
    up.fail_with(None);
    // Within the same second: an answer recorded as checked now would still be fresh, and nobody would ask.
    let before = up.manifest_heads() + up.manifest_gets();
    assert_eq!(head(edge).await, (200, Some(digest.clone())));
    let asked = up.manifest_heads() + up.manifest_gets() - before;
    assert_eq!(asked, 1, "the edge took the owner's stale answer for a fresh check");
}
