//! wharf and the node's container runtime: the real containerd (Debian's 1.6) with its CRI image service
//! on, and `hosts.toml` naming wharf as the mirror. The runtime client pulls through wharf, reads the
//! image's status and sets and removes the kubelet-GC pin label; the warm list puts `into_runtime` images
//! into the runtime, follows their tags, reports a missing, stopped or hung runtime without waiting for it,
//! and removes its pins from images it no longer lists.

use crate::admin::{admin, admin_url, with_config};
use crate::support::containerd::{Containerd, write_hosts_dir};
use crate::support::fake_upstream::client;
use crate::support::images::{Seeded, TestImage};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use wharf::runtime::{PIN_LABEL, Runtime, RuntimeError, WHARF_LABEL};

const CALLS: Duration = Duration::from_secs(60);

/// `ctr -n k8s.io images ls` lines naming `reference`.
fn listed(ctd: &Containerd, reference: &str) -> String {
    let mut cmd = std::process::Command::new("ctr");
    cmd.arg("--address").arg(ctd.socket()).args(["-n", "k8s.io", "images", "ls"]);
    let out = crate::support::images::run_ok(&mut cmd, Duration::from_secs(30));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(reference)).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cri_pull_comes_through_wharf_and_the_pin_label_is_set_and_removed() {
    let seeded = shared();
    // Its own repository: the upstream counts below see only this test's traffic.
    let image = seeded.alias("test/docker");
    let tmp = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(
        &tmp.path().join("data"),
        &["--upstream".into(), format!("registry.test={}", seeded.registry.url())],
    );
    let hosts = tmp.path().join("hosts");
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    let ctd = Containerd::start_with_cri(&hosts);
    let reference = format!("registry.test/{}", image.reference());

    let runtime = Runtime::connect(&ctd.endpoint(), CALLS).await.unwrap();
    let version = runtime.version().await.unwrap();
    assert_eq!(version.name, "containerd");
    assert_eq!(runtime.image(&reference).await.unwrap(), None);
    let gets = |blob: &str| seeded.registry.count("GET", &format!("/v2/{}/blobs/{blob}", image.repo));
    let before: Vec<usize> = image.blobs.iter().map(|(blob, _)| gets(blob)).collect();
    runtime.pull(&reference, CALLS).await.unwrap();
    let pulled = runtime.image(&reference).await.unwrap().expect("the runtime has the image after the pull");
    assert!(pulled.has_digest(&image.manifest_digest), "{pulled:?} is not at {}", image.manifest_digest);
    // Through wharf: every blob left the upstream once, and wharf logged the mirror's requests.
    for ((blob, _), before) in image.blobs.iter().zip(before) {
        assert_eq!(gets(blob) - before, 1, "{blob} left the upstream other than once");
    }
    let log = wharf.log();
    assert!(log.lines().any(|l| l.contains(&format!("/v2/{}/blobs/", image.repo)) && l.contains("ns=registry.test")));

    // The pin label, set and removed on the tag's record in CRI's namespace.
    runtime.set_pinned(&reference, true).await.unwrap();
    assert!(listed(&ctd, &reference).contains(&format!("{PIN_LABEL}=pinned")), "{}", listed(&ctd, &reference));
    let pinned = runtime.image(&reference).await.unwrap().unwrap().pinned;
    if version.reports_pinned() {
        assert!(pinned, "containerd {} does not report the pin", version.version);
    } else {
        eprintln!(
            "containerd {} does not report CRI `pinned` (1.7 and later do): checked the label only",
            version.version
        );
    }
    runtime.set_pinned(&reference, false).await.unwrap();
    assert!(!listed(&ctd, &reference).contains(PIN_LABEL), "{}", listed(&ctd, &reference));
    assert!(!listed(&ctd, &reference).is_empty(), "removing the label removed the image");
    // A pin wharf did not set (the sandbox image's, an operator's) is left alone.
    let mut label = std::process::Command::new("ctr");
    label.arg("--address").arg(ctd.socket()).args(["-n", "k8s.io", "images", "label", &reference]);
    crate::support::images::run_ok(label.arg(format!("{PIN_LABEL}=pinned")), Duration::from_secs(30));
    assert!(runtime.set_pinned(&reference, false).await.unwrap(), "wharf reports someone else's pin as gone");
    assert!(listed(&ctd, &reference).contains(&format!("{PIN_LABEL}=pinned")), "wharf removed someone else's pin");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_runtime_socket_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", tmp.path().join("no.sock").display());
    match Runtime::connect(&endpoint, CALLS).await {
        Err(RuntimeError::Connect(at, why)) => {
            assert_eq!(at, endpoint);
            assert!(why.contains("No such file"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(Runtime::connect("tcp://127.0.0.1:1", CALLS).await, Err(RuntimeError::Endpoint(_))));
}

/// The warm-list config of one `into_runtime` image (pinned or not) with passes every second.
fn warm_toml(endpoint: &str, image: Option<(&str, bool)>, extra: &str) -> String {
    let mut toml =
        format!("[admin]\nlisten = \"127.0.0.1:0\"\n[warm]\ninterval = 1\nruntime_endpoint = \"{endpoint}\"\n{extra}");
    if let Some((image, pin)) = image {
        toml += &format!("[[warm.images]]\nimage = \"{image}\"\ninto_runtime = true\npin_in_runtime = {pin}\n");
    }
    toml
}

/// wharf on a fresh data directory, upstream `registry.test` = the shared registry, tags revalidated on
/// every use, configured by `toml`.
fn start_wharf(dir: &Path, data: &Path, seeded: &Seeded, toml: &str) -> Wharf {
    let upstream =
        ["--upstream".into(), format!("registry.test={}", seeded.registry.url()), "--tag-ttl".into(), "0".into()];
    Wharf::start(data, &with_config(dir, toml, &upstream))
}

/// `image`'s entry in the admin pins view's `runtime` part.
async fn in_runtime(api: &str, image: &str) -> Value {
    let (status, body) = admin("GET", &format!("{api}/pins"), None, None).await;
    assert_eq!(status, 200, "{body}");
    body["runtime"][image].clone()
}

/// Polls `/pins` until `image`'s runtime entry satisfies `cond` (60 s); returns it.
async fn wait_in_runtime(api: &str, image: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entry = in_runtime(api, image).await;
        if cond(&entry) {
            return entry;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}; runtime entry of {image}: {entry}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the runtime worker has checked the entry.
fn checked(entry: &Value) -> bool {
    entry["checked_at"].as_u64().is_some_and(|t| t > 0)
}

/// A `/metrics` sample's value (`None` when absent).
async fn metric(wharf: &Wharf, sample: &str) -> Option<f64> {
    let text = client().get(format!("{}/metrics", wharf.url())).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// The `ctr -n k8s.io images ls` line of exactly `reference` (empty when the runtime has no such record).
fn ctr_line(ctd: &Containerd, reference: &str) -> String {
    let lines = listed(ctd, reference);
    lines.lines().find(|l| l.split_whitespace().next() == Some(reference)).unwrap_or_default().to_owned()
}

/// Whether a manifest GET of `image` through wharf answers 200 (wharf keeps serving).
async fn serves(wharf: &Wharf, image: &TestImage) -> bool {
    let url = format!("{}/v2/registry.test/{}/manifests/{}", wharf.url(), image.repo, image.tag);
    let accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    client().get(url).header("Accept", accept).send().await.unwrap().status() == 200
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_images_go_into_the_runtime_follow_their_tag_and_lose_their_pin_when_unlisted() {
    let seeded = shared();
    let image = seeded.alias("test/docker");
    let tmp = tempfile::tempdir().unwrap();
    let (hosts, data) = (tmp.path().join("hosts"), tmp.path().join("data"));
    let ctd = Containerd::start_with_cri(&hosts);
    let name = format!("registry.test/{}", image.reference());
    let toml = warm_toml(&ctd.endpoint(), Some((&name, true)), "");
    let mut wharf = start_wharf(tmp.path(), &data, seeded, &toml);
    // Until the mirror is named, a runtime pull fails without reaching any registry; the next pass retries.
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    let api = admin_url(&wharf);

    // 1. In the runtime at wharf's digest, checked through CRI and through ctr.
    let entry = wait_in_runtime(&api, &name, "the image is in the runtime", |e| e["present"] == true).await;
    assert_eq!(entry["digest"], image.manifest_digest.as_str(), "{entry}");
    let runtime = Runtime::connect(&ctd.endpoint(), CALLS).await.unwrap();
    let status = runtime.image(&name).await.unwrap().expect("CRI ImageStatus knows the image");
    assert!(status.has_digest(&image.manifest_digest), "{status:?}");
    assert!(ctr_line(&ctd, &name).contains(&image.manifest_digest), "{}", ctr_line(&ctd, &name));
    // Its bytes came through wharf: each blob left the upstream once (the warm pass), and the runtime's
    // requests reached wharf as a mirror of registry.test.
    for (blob, _) in &image.blobs {
        let gets = seeded.registry.count("GET", &format!("/v2/{}/blobs/{blob}", image.repo));
        assert_eq!(gets, 1, "{blob} left the upstream {gets} times");
    }
    let mirrored = format!("/v2/{}/blobs/", image.repo);
    assert!(wharf.log().lines().any(|l| l.contains(&mirrored) && l.contains("ns=registry.test")), "no mirror request");
    // 4. Pinned: the label on the tag's record, CRI `pinned` where the runtime reports it, and the status.
    let entry = wait_in_runtime(&api, &name, "the image is pinned", |e| e["pinned"] == true).await;
    let line = ctr_line(&ctd, &name);
    assert!(line.contains(&format!("{PIN_LABEL}=pinned")) && line.contains(WHARF_LABEL), "{line}");
    let version = runtime.version().await.unwrap();
    if version.reports_pinned() {
        assert!(runtime.image(&name).await.unwrap().unwrap().pinned, "CRI does not report the pin");
    } else {
        eprintln!("containerd {} does not report CRI `pinned` (1.7 and later do): checked the label", version.version);
        assert!(entry["note"].as_str().is_some_and(|n| n.contains("1.7")), "no note on the old runtime: {entry}");
    }
    // Present at the digest: later passes check and pull nothing (no mirror request from the runtime).
    let mirror_requests = || wharf.log().lines().filter(|l| l.contains("ns=registry.test")).count();
    let before = mirror_requests();
    let since = entry["checked_at"].as_u64().unwrap();
    wait_in_runtime(&api, &name, "two more passes", |e| e["checked_at"].as_u64().is_some_and(|t| t >= since + 2)).await;
    assert_eq!(mirror_requests(), before, "a pass pulled an image the runtime already had");
    let sample = |m: &str| format!("wharf_{m}{{image=\"{name}\"}}");
    assert_eq!(metric(&wharf, &sample("warm_image_in_runtime")).await, Some(1.0));
    assert_eq!(metric(&wharf, &sample("warm_image_runtime_pinned")).await, Some(1.0));

    // 2. The tag moves upstream (to the multi-platform index): the next pass puts the new digest into the
    // runtime and pins the new record.
    let moved = seeded.copy_as("test/multi", &image.repo);
    wait_in_runtime(&api, &name, "the moved tag is in the runtime", |e| {
        e["present"] == true && e["digest"] == moved.manifest_digest.as_str() && e["pinned"] == true
    })
    .await;
    let status = runtime.image(&name).await.unwrap().unwrap();
    assert!(status.has_digest(&moved.manifest_digest), "{status:?}");
    let line = ctr_line(&ctd, &name);
    assert!(line.contains(&moved.manifest_digest) && line.contains(&format!("{PIN_LABEL}=pinned")), "{line}");

    // 4. Off the warm list (same data, same runtime): the pin goes, the image stays for the kubelet.
    wharf.terminate();
    let _wharf = start_wharf(tmp.path(), &data, seeded, &warm_toml(&ctd.endpoint(), None, ""));
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctr_line(&ctd, &name).contains(PIN_LABEL) {
        assert!(Instant::now() < deadline, "the pin stayed: {}", ctr_line(&ctd, &name));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = ctr_line(&ctd, &name);
    assert!(line.contains(&moved.manifest_digest) && !line.contains(WHARF_LABEL), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_stopped_runtime_is_reported_and_the_image_arrives_once_it_is_back() {
    let seeded = shared();
    let image = seeded.alias("test/docker");
    let tmp = tempfile::tempdir().unwrap();
    let (hosts, data) = (tmp.path().join("hosts"), tmp.path().join("data"));
    // Configured, not running: no socket yet.
    let mut ctd = Containerd::prepare_with_cri(&hosts);
    let name = format!("registry.test/{}", image.reference());
    let wharf = start_wharf(tmp.path(), &data, seeded, &warm_toml(&ctd.endpoint(), Some((&name, false)), ""));
    write_hosts_dir(&hosts, "registry.test", &wharf.url());
    let api = admin_url(&wharf);

    // 3. Missing: the status says why, the warm list and the mirror carry on.
    let entry = wait_in_runtime(&api, &name, "the missing socket is reported", checked).await;
    assert_eq!(entry["present"], false, "{entry}");
    assert!(entry["error"].as_str().is_some_and(|e| e.contains("No such file")), "{entry}");
    assert_eq!(metric(&wharf, &format!("wharf_warm_image_ready{{image=\"{name}\"}}")).await, Some(1.0));
    assert_eq!(metric(&wharf, &format!("wharf_warm_image_in_runtime{{image=\"{name}\"}}")).await, Some(0.0));
    assert!(serves(&wharf, &image).await, "wharf stopped serving");

    // Back: the image arrives at the next pass.
    tokio::task::block_in_place(|| ctd.run());
    let entry = wait_in_runtime(&api, &name, "the image arrives", |e| e["present"] == true).await;
    assert!(entry.get("error").is_none(), "{entry}");
    assert!(ctr_line(&ctd, &name).contains(&image.manifest_digest));

    // Stopped: said so, and a tag that moves meanwhile reaches the runtime once it is back.
    tokio::task::block_in_place(|| ctd.stop());
    let entry = wait_in_runtime(&api, &name, "the stopped runtime is reported", |e| e["present"] == false).await;
    assert!(entry["error"].as_str().is_some_and(|e| e.contains("runtime at")), "{entry}");
    let moved = seeded.copy_as("test/multi", &image.repo);
    assert!(serves(&wharf, &image).await, "wharf stopped serving");
    let entry =
        wait_in_runtime(&api, &name, "wharf follows the tag", |e| e["digest"] == moved.manifest_digest.as_str()).await;
    assert_eq!(entry["present"], false, "{entry}");
    tokio::task::block_in_place(|| ctd.run());
    wait_in_runtime(&api, &name, "the moved tag arrives", |e| e["present"] == true).await;
    assert!(ctr_line(&ctd, &name).contains(&moved.manifest_digest), "{}", ctr_line(&ctd, &name));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_that_never_answers_costs_its_bound_and_never_holds_up_the_warm_list() {
    let seeded = shared();
    let image = seeded.alias("test/docker");
    let tmp = tempfile::tempdir().unwrap();
    // A socket that accepts connections and never answers on them.
    let socket = tmp.path().join("hung.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
        }
    });
    let name = format!("registry.test/{}", image.reference());
    let endpoint = format!("unix://{}", socket.display());
    // Runtime calls bounded at 1 s; the pull bound (unused) and the pass interval stay far from it.
    let toml = warm_toml(&endpoint, Some((&name, true)), "runtime_timeout = 1\n");
    let wharf = start_wharf(tmp.path(), &tmp.path().join("data"), seeded, &toml);
    let api = admin_url(&wharf);

    let entry = wait_in_runtime(&api, &name, "the hung runtime is reported", checked).await;
    assert!(entry["error"].as_str().is_some_and(|e| e.contains("in time") || e.contains("within")), "{entry}");
    assert_eq!(entry["present"], false, "{entry}");
    // The warm list went on meanwhile: passes keep succeeding every second.
    let last = format!("wharf_warm_image_last_success_timestamp_seconds{{image=\"{name}\"}}");
    let first = metric(&wharf, &last).await.unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&wharf, &last).await.unwrap_or(0.0) <= first {
        assert!(Instant::now() < deadline, "the warm list stopped while the runtime hung");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serves(&wharf, &image).await, "wharf stopped serving");
    held.abort();
}
