//! A full disk, on real small filesystems (tmpfs mounted by the test): a blob that can never fit is streamed
//! without being written; fills stop while free space is below the reserve the metadata database needs; and a
//! metadata database that failed anyway (the disk filled behind wharf's back) is reopened once space is back,
//! without a restart, while blobs and manifests are served from the files meanwhile.

use crate::support::fake_upstream::{
    FakeUpstream, Outcome, blob_path, client, fetch, get_ok, headers_of, spawn_fetch, wait_until,
};
use crate::support::wharf::Wharf;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REPO: &str = "test/app";

/// A tmpfs mounted for the test, unmounted on drop. Needs root (CI runs as root); fails loudly otherwise.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: usize) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs failed: this test needs root (it runs as root in CI)");
        SmallFs { path, _dir: dir }
    }

    /// Bytes available on the filesystem.
    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a properly sized out-parameter.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Writes a file (beside wharf's data directory) until only `leave` bytes are free, or until ENOSPC
    /// with `leave` 0. Returns its path.
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path.join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let piece = vec![0x5a_u8; 64 * 1024];
        loop {
            let want = self.free().saturating_sub(leave).min(piece.len() as u64) as usize;
            if want == 0 {
                break;
            }
            match f.write(&piece[..want]) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the filesystem: {e}"),
            }
        }
        if leave == 0 {
            // The last partial page.
            while matches!(f.write(&piece[..512]), Ok(n) if n > 0) {}
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() { out.extend(files_under(&p)) } else { out.push(p) }
    }
    out
}

/// Starts wharf on `data_dir` with a `[cache]` section written to a config file outside the small filesystem.
fn start(fake: &FakeUpstream, data_dir: &Path, conf_dir: &Path, cache: &str) -> Wharf {
    let file = conf_dir.join("wharf.toml");
    std::fs::write(&file, format!("[cache]\n{cache}")).unwrap();
    let mut args = fake.wharf_args();
    args.extend(["--config".to_string(), file.display().to_string()]);
    Wharf::start(data_dir, &args)
}

/// A manifest under `tag` upstream (its content does not matter here).
fn put_manifest(fake: &FakeUpstream, tag: &str) -> (String, String) {
    let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"tag":"{tag}"}}}}"#);
    (fake.put_manifest(REPO, tag, OCI_MANIFEST, body.clone()), body)
}

async fn status(c: &reqwest::Client, url: &str) -> u16 {
    c.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Polls `/readyz` every 50 ms until it answers `want`; how long that took, or None after `within`.
async fn readyz_becomes(c: &reqwest::Client, wharf: &Wharf, want: u16, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if status(c, &format!("{}/readyz", wharf.url())).await == want {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// GET of a manifest through wharf: the body, or what went wrong.
async fn manifest(c: &reqwest::Client, wharf: &Wharf, reference: &str) -> Result<String, String> {
    match fetch(c, &format!("{}/v2/{REPO}/manifests/{reference}", wharf.url()), &[("Accept", OCI_MANIFEST)]).await {
        Outcome::Complete(200, _, body) => Ok(String::from_utf8_lossy(&body).into_owned()),
        other => Err(format!("manifest {reference}: {other:?}")),
    }
}

/// A blob GET through wharf that must return `want`.
async fn blob(c: &reqwest::Client, wharf: &Wharf, digest: &str, want: &[u8]) -> Result<(), String> {
    match fetch(c, &format!("{}/v2/{REPO}/blobs/{digest}", wharf.url()), &[]).await {
        Outcome::Complete(200, _, body) if body == want => Ok(()),
        Outcome::Complete(status, _, body) => Err(format!("blob {digest}: {status}, {} bytes", body.len())),
        other => Err(format!("blob {digest}: {other:?}")),
    }
}

/// Rounds of the small-filesystem pull; the failure it guards against struck in about 3 runs of 4.
const ROUNDS: usize = 4;

/// The pull from the issue, scaled down: a 40 MiB filesystem, no byte budget, default watermarks, 24 MiB of
/// small blobs cached, then a 64 MiB blob pulled while other clients keep using the cache (access times and
/// a new tag get written meanwhile). Then every kind of request must still work: a new blob is cached, a
/// new tag is learnt, cached content is served, and wharf is ready. Before the fix, the 64 MiB fill filled
/// the disk (and the partial file stayed allocated while its clients streamed on from the upstream), sled's
/// next write failed, and every metadata write answered 500 until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_blob_larger_than_a_small_filesystem_never_breaks_the_metadata() {
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        if let Err(e) = small_filesystem_round().await {
            failures.push(format!("round {round}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} of {ROUNDS} rounds failed:\n{}", failures.len(), failures.join("\n"));
}

async fn small_filesystem_round() -> Result<(), String> {
    let fs = SmallFs::mount(40);
    let conf = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start().await;
    let small: Vec<_> = (0..6).map(|_| fake.add_random_blob(4 * MIB)).collect();
    let (big, big_data) = fake.add_random_blob(64 * MIB);
    let (later, later_data) = fake.add_random_blob(2 * MIB);
    put_manifest(&fake, "1.0");
    let data_dir = fs.path.join("data");
    // Default bounds (the blobs are too recent to evict), and access times written every second.
    let wharf = start(&fake, &data_dir, conf.path(), "gc_interval = 1\n");
    let c = client();

    for (digest, data) in &small {
        blob(&c, &wharf, digest, data).await?;
    }
    manifest(&c, &wharf, "1.0").await?;

    // The big pull holds its response open past 40 MiB while the other clients go on for 3 s.
    let gate = fake.gate(&big, 40 * MIB);
    let (task, head) = spawn_fetch(&c, &format!("{}/v2/{REPO}/blobs/{big}", wharf.url()), &[]);
    let (code, _) = headers_of("the big blob", head).await;
    if code != 200 {
        return Err(format!("big blob: {code}"));
    }
    gate.wait_reached().await;
    let busy_until = Instant::now() + Duration::from_secs(3);
    let (mut tag, mut failed) = (0, Vec::new());
    while Instant::now() < busy_until {
        for (digest, data) in &small {
            failed.extend(blob(&c, &wharf, digest, data).await.err());
        }
        // Clients learning tags: HEADs (a tag entry each) and a GET (a manifest file too).
        for _ in 0..50 {
            put_manifest(&fake, &format!("t{tag}"));
            let url = format!("{}/v2/{REPO}/manifests/t{tag}", wharf.url());
            let head = c.head(url).header("Accept", OCI_MANIFEST).send().await.map_err(|e| e.to_string())?;
            if head.status() != 200 {
                failed.push(format!("HEAD t{tag}: {}", head.status()));
            }
            tag += 1;
        }
        put_manifest(&fake, &format!("t{tag}"));
        failed.extend(manifest(&c, &wharf, &format!("t{tag}")).await.err());
        tag += 1;
    }
    gate.release();
    match task.await.unwrap() {
        Outcome::Complete(200, _, body) if body == big_data => {}
        other => return Err(format!("big blob body: {other:?}")),
    }

    let during = match failed.len() {
        0 => String::new(),
        n => format!("{n} requests failed during the big pull, the first: {}; then ", failed[0]),
    };
    after_the_big_pull(&c, &wharf, &fake, &data_dir, &small, (&later, &later_data))
        .await
        .map_err(|e| format!("{during}after it: {e}"))?;
    if failed.is_empty() { Ok(()) } else { Err(format!("{during}all well after it")) }
}

/// Everything works after the big pull, without a restart.
async fn after_the_big_pull(
    c: &reqwest::Client,
    wharf: &Wharf,
    fake: &FakeUpstream,
    data_dir: &Path,
    small: &[(String, bytes::Bytes)],
    (later, later_data): (&str, &[u8]),
) -> Result<(), String> {
    if readyz_becomes(c, wharf, 200, Duration::from_secs(10)).await.is_none() {
        return Err("not ready 10 s after the big pull".into());
    }
    blob(c, wharf, later, later_data).await?;
    if !blob_path(data_dir, later).is_file() {
        return Err("a blob pulled after the big one was not cached".into());
    }
    put_manifest(fake, "after");
    manifest(c, wharf, "after").await?;
    manifest(c, wharf, "1.0").await?;
    for (digest, data) in small {
        blob(c, wharf, digest, data).await?;
    }
    // Refused before its first byte, not abandoned at ENOSPC.
    let metrics = c.get(format!("{}/metrics", wharf.url())).send().await.unwrap().text().await.unwrap();
    if !metrics.contains("wharf_uncached_blobs_total{reason=\"too_large\"} 1")
        || metrics.contains("wharf_uncached_blobs_total{reason=\"disk_full\"}")
    {
        let lines: Vec<_> = metrics.lines().filter(|l| l.contains("uncached")).collect();
        return Err(format!("the big blob was not refused up front: {lines:?}"));
    }
    Ok(())
}

/// A fill that would run the filesystem dry stops with the reserve still free (`cache.min_free_bytes`, here
/// 4 MiB, a tenth of the filesystem): its client still gets every byte (from the upstream), the partial file
/// goes, and wharf keeps caching what fits. The blob fits when its fill starts; a file written behind wharf's
/// back then leaves it 10 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_stops_at_the_free_space_reserve_and_its_client_still_gets_every_byte() {
    let fs = SmallFs::mount(40);
    let conf = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start().await;
    let (big, data) = fake.add_random_blob(16 * MIB);
    let (small, small_data) = fake.add_random_blob(MIB / 2);
    let data_dir = fs.path.join("data");
    let wharf = start(&fake, &data_dir, conf.path(), &format!("min_free_bytes = {}\n", 64 * MIB));
    let c = client();

    let gate = fake.gate(&big, MIB);
    // The client reads nothing yet: its response keeps the partial file open, as a slow client would.
    let held = c.get(format!("{}/v2/{REPO}/blobs/{big}", wharf.url())).send().await.unwrap();
    assert_eq!(held.status(), 200);
    gate.wait_reached().await;
    let filler = fs.fill(10 * MIB as u64);
    gate.release();
    wait_until("the fill gives up", || wharf.log().contains("disk full during a fill")).await;
    let free = fs.free();
    // The reserve, less a little (the piece in hand when the check failed, and metadata writes).
    assert!(free >= 7 * MIB as u64 / 2, "the fill ate into the reserve: {free} bytes free\n{}", wharf.log());
    assert!(wharf.log().contains("kept for metadata"), "not logged as the reserve:\n{}", wharf.log());

    let body = held.bytes().await.expect("the client gets the rest from the upstream");
    assert!(body == data, "body differs from the blob");
    assert!(!blob_path(&data_dir, &big).exists(), "a blob that did not fit was committed");
    wait_until("the partial file is removed", || files_under(&data_dir.join("tmp")).is_empty()).await;
    let metrics = c.get(format!("{}/metrics", wharf.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("wharf_uncached_blobs_total{reason=\"disk_full\"} 1"), "{metrics}");

    // Still serving, and still caching what fits once there is room.
    std::fs::remove_file(filler).unwrap();
    get_ok(&c, &format!("{}/v2/{REPO}/blobs/{small}", wharf.url()), &small_data).await;
    assert!(blob_path(&data_dir, &small).is_file());
    get_ok(&c, &format!("{}/v2/{REPO}/blobs/{big}", wharf.url()), &data).await;
    assert_eq!(status(&c, &format!("{}/readyz", wharf.url())).await, 200);
}

/// The disk fills up behind wharf's back (a file written by the test) during a fill, and a metadata write
/// fails. wharf reports not ready within seconds, logs and counts the failure once, keeps serving cached
/// blobs and manifests from the files, and once the file is removed reopens its database without a restart:
/// ready again within seconds, serving everything cached with the right bytes and caching again.
#[tokio::test(flavor = "multi_thread")]
async fn a_metadata_failure_on_a_full_disk_is_repaired_without_a_restart() {
    let fs = SmallFs::mount(40);
    let conf = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start().await;
    let cached: Vec<_> = (0..3).map(|_| fake.add_random_blob(2 * MIB)).collect();
    let (filling, filling_data) = fake.add_random_blob(8 * MIB);
    let (later, later_data) = fake.add_random_blob(MIB);
    let (m1, m1_body) = put_manifest(&fake, "1.0");
    let data_dir = fs.path.join("data");
    let wharf = start(&fake, &data_dir, conf.path(), "gc_interval = 1\n");
    let c = client();
    for (digest, data) in &cached {
        blob(&c, &wharf, digest, data).await.unwrap();
    }
    assert_eq!(manifest(&c, &wharf, "1.0").await.unwrap(), m1_body);
    assert_eq!(status(&c, &format!("{}/readyz", wharf.url())).await, 200);

    let gate = fake.gate(&filling, MIB);
    let (task, head) = spawn_fetch(&c, &format!("{}/v2/{REPO}/blobs/{filling}", wharf.url()), &[]);
    assert_eq!(headers_of("the blob being filled", head).await.0, 200);
    gate.wait_reached().await;
    let filler = fs.fill(0);
    // Metadata writes on the full disk: clients learn new tags with HEADs (a tag entry each, no file). sled
    // buffers them, fills what its log file already holds, and fails when it needs a new page. Each HEAD
    // is answered meanwhile.
    let started = Instant::now();
    let mut noticed = false;
    for n in 0..20_000 {
        put_manifest(&fake, &format!("t{n}"));
        let url = format!("{}/v2/{REPO}/manifests/t{n}", wharf.url());
        let head = c.head(url).header("Accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD of a new tag on a full disk");
        if n % 50 == 0 && status(&c, &format!("{}/readyz", wharf.url())).await == 503 {
            eprintln!("not ready after {} new tags, {:?}", n + 1, started.elapsed());
            noticed = true;
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the metadata never met the full disk");
    }
    if !noticed {
        noticed = readyz_becomes(&c, &wharf, 503, Duration::from_secs(15)).await.is_some();
    }
    assert!(noticed, "still ready 15 s after the metadata database met a full disk:\n{}", wharf.log());

    // Meanwhile: cached blobs (GET and HEAD) and manifests (by digest and by tag) from the files.
    for (digest, data) in &cached {
        blob(&c, &wharf, digest, data).await.unwrap();
        let head = c.head(format!("{}/v2/{REPO}/blobs/{digest}", wharf.url())).send().await.unwrap();
        assert_eq!(head.status(), 200);
    }
    assert_eq!(manifest(&c, &wharf, &m1).await.unwrap(), m1_body);
    assert_eq!(manifest(&c, &wharf, "1.0").await.unwrap(), m1_body);
    // A manifest not cached yet cannot be stored on this disk: it is served from the upstream all the same.
    let (_, m2_body) = put_manifest(&fake, "2.0");
    assert_eq!(manifest(&c, &wharf, "2.0").await.unwrap(), m2_body);
    // The fill in progress cannot finish on this disk: its client continues from the upstream.
    gate.release();
    match task.await.unwrap() {
        Outcome::Complete(200, _, body) => assert!(body == filling_data, "body differs from the blob"),
        other => panic!("the blob being filled: {other:?}"),
    }
    assert_eq!(wharf.metric("wharf_metadata_degraded").await, 1.0);

    std::fs::remove_file(filler).unwrap();
    let recovered = readyz_becomes(&c, &wharf, 200, Duration::from_secs(30)).await;
    let recovered = recovered.unwrap_or_else(|| panic!("not ready 30 s after space came back:\n{}", wharf.log()));
    // It retries every 2 s: well within 10 s, not at some later restart or timeout.
    assert!(recovered < Duration::from_secs(10), "ready again only after {recovered:?}");
    eprintln!("ready again {recovered:?} after the space came back");

    for (digest, data) in &cached {
        blob(&c, &wharf, digest, data).await.unwrap();
    }
    assert_eq!(manifest(&c, &wharf, "1.0").await.unwrap(), m1_body);
    assert_eq!(manifest(&c, &wharf, "2.0").await.unwrap(), m2_body);
    blob(&c, &wharf, &later, &later_data).await.unwrap();
    wait_until("the new blob is cached", || blob_path(&data_dir, &later).is_file()).await;
    blob(&c, &wharf, &filling, &filling_data).await.unwrap();
    put_manifest(&fake, "3.0");
    manifest(&c, &wharf, "3.0").await.unwrap();
    let log = wharf.log();
    assert_eq!(log.matches("metadata database failed").count(), 1, "logged once per failure:\n{log}");
    assert!(log.contains("metadata database reopened"), "{log}");
    assert_eq!(wharf.metric("wharf_metadata_failures_total").await, 1.0);
    assert_eq!(wharf.metric("wharf_metadata_degraded").await, 0.0);
    assert_eq!(status(&c, &format!("{}/readyz", wharf.url())).await, 200);
}
