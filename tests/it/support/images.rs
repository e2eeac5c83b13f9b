//! Test images built in Rust (no committed blobs, no network) and pushed to a registry with skopeo.
//!
//! [`seed`] writes three OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/..`) with real tar
//! layers (gzip ones use stored deflate blocks: valid gzip, no compression crate needed) and pushes them:
//! * `test/multi:v1`: OCI index, linux/amd64 (3 layers) + linux/arm64 (2 layers), one layer shared by both;
//! * `test/docker:v1`: Docker schema2 (`skopeo copy --format v2s2`, which rewrites the manifest);
//! * `test/big:v1`: OCI manifest, a small gzip layer + an uncompressed tar of 256 MiB of random bytes.
//!
//! OCI images are pushed with `--preserve-digests` (registry bytes == layout bytes). Every digest recorded
//! in a [`TestImage`] is read back from the registry (manifest GET, hashed), so it is what clients get.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::registry::{Registry, http};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Bytes of random file data in the big layer (the layer adds tar headers).
pub const BIG_DATA: u64 = 256 << 20;

/// A manifest or index exactly as the registry serves it.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// One seeded image, as stored in the registry.
#[derive(Clone, Debug)]
pub struct TestImage {
    pub repo: String,
    pub tag: String,
    /// Digest of the top-level manifest (or index) behind `tag`.
    pub manifest_digest: String,
    pub media_type: String,
    /// Every manifest, the top-level one first, then an index's children in index order.
    pub manifests: Vec<Manifest>,
    /// Configs and layers of every platform, deduplicated: `("sha256:..", size)`.
    pub blobs: Vec<(String, u64)>,
    /// The OCI layout it was pushed from (for `test/docker` the pre-conversion OCI source).
    pub layout: PathBuf,
}

impl TestImage {
    /// `repo:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repo, self.tag)
    }

    /// Every digest a full pull fetches: manifests, configs, layers.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let m = self.manifests.iter().map(|m| m.digest.clone());
        m.chain(self.blobs.iter().map(|(d, _)| d.clone())).collect()
    }

    /// `(manifest digest, config digest)` of every image manifest (not indexes).
    pub fn configs(&self) -> Vec<(String, String)> {
        let config = |m: &Manifest| parse(m)["config"]["digest"].as_str().unwrap().to_string();
        self.manifests.iter().filter(|m| !is_index(&m.media_type)).map(|m| (m.digest.clone(), config(m))).collect()
    }

    /// Every layer digest (the blobs that are not configs).
    pub fn layers(&self) -> BTreeSet<String> {
        let configs: BTreeSet<String> = self.configs().into_iter().map(|(_, c)| c).collect();
        self.blobs.iter().map(|(d, _)| d.clone()).filter(|d| !configs.contains(d)).collect()
    }
}

/// A registry and the images pushed to it.
pub struct Seeded {
    pub registry: Registry,
    pub images: Vec<TestImage>,
}

static ALIASES: AtomicUsize = AtomicUsize::new(0);

impl Seeded {
    /// The seeded image in repository `repo` (`"test/multi"`, `"test/docker"` or `"test/big"`).
    pub fn image(&self, repo: &str) -> &TestImage {
        self.images.iter().find(|i| i.repo == repo).unwrap_or_else(|| panic!("no seeded image {repo}"))
    }

    /// Where the registry stores blob or manifest `digest`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.registry.blob_path(digest)
    }

    /// The bytes the registry serves for `digest` (reads the whole blob into memory).
    pub fn blob_bytes(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.blob_path(digest)).unwrap_or_else(|e| panic!("read blob {digest}: {e}"))
    }

    /// Makes image `repo` also available under a new, process-unique repository (`REPO-aN`) by cross-repo
    /// blob mounts and manifest PUTs (no blob bytes are copied), so a test can count the upstream requests
    /// for its own repository in the registry's log while other tests use the same registry.
    pub fn alias(&self, repo: &str) -> TestImage {
        let new = format!("{repo}-a{}", ALIASES.fetch_add(1, Ordering::Relaxed));
        self.copy_as(repo, &new)
    }

    /// Puts image `repo` under repository `new` (its tag moves there if `new` already has one), the way
    /// [`Seeded::alias`] does.
    pub fn copy_as(&self, repo: &str, new: &str) -> TestImage {
        let image = self.image(repo);
        let host = self.registry.host();
        for (digest, _) in &image.blobs {
            let uri = format!("/v2/{new}/blobs/uploads/?mount={digest}&from={repo}");
            let r = http(&host, "POST", &uri, &[], b"").expect("mount blob");
            assert_eq!(r.status, 201, "POST {uri}: {}", String::from_utf8_lossy(&r.body));
        }
        for (i, m) in image.manifests.iter().enumerate().rev() {
            let reference = if i == 0 { &image.tag } else { &m.digest };
            let uri = format!("/v2/{new}/manifests/{reference}");
            let r = http(&host, "PUT", &uri, &[("Content-Type", &m.media_type)], &m.bytes).expect("put manifest");
            assert_eq!(r.status, 201, "put {uri}: {}", String::from_utf8_lossy(&r.body));
        }
        TestImage { repo: new.to_owned(), ..image.clone() }
    }
}

/// Builds the three test images under `dir`, pushes them to `registry`, and records what it stores.
pub fn seed(registry: Registry, dir: &Path) -> Seeded {
    let started = Instant::now();
    let images = [("multi", build_multi as Build), ("docker", build_docker), ("big", build_big)];
    let registry_ref = &registry;
    let images = std::thread::scope(|s| {
        let handles = images.map(|(name, build)| s.spawn(move || seed_one(registry_ref, name, build, dir)));
        handles.map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    eprintln!("built and pushed the test images in {:.1?}", started.elapsed());
    Seeded { registry, images: images.into() }
}

/// Writes one OCI layout.
type Build = fn(&Path);

/// Builds layout `DIR/NAME`, pushes it as `test/NAME:v1` and reads back what the registry stores.
fn seed_one(registry: &Registry, name: &str, build: Build, dir: &Path) -> TestImage {
    let (layout, repo, started) = (dir.join(name), format!("test/{name}"), Instant::now());
    build(&layout);
    let built = started.elapsed();
    let args: &[&str] = if name == "docker" { &["--format", "v2s2"] } else { &["--preserve-digests"] };
    let mut cmd = skopeo();
    cmd.args(["copy", "--all", "--dest-tls-verify=false"]).args(args);
    cmd.arg(format!("oci:{}:v1", layout.display())).arg(format!("docker://{}/{repo}:v1", registry.host()));
    run_ok(&mut cmd, Duration::from_secs(600));
    eprintln!("seeded {repo}:v1: built in {built:.1?}, pushed in {:.1?}", started.elapsed() - built);
    let top = get_manifest(registry, &repo, "v1");
    let mut manifests = vec![top.clone()];
    if is_index(&top.media_type) {
        for d in parse(&top)["manifests"].as_array().unwrap() {
            manifests.push(get_manifest(registry, &repo, d["digest"].as_str().unwrap()));
        }
    }
    let mut blobs: Vec<(String, u64)> = Vec::new();
    for v in manifests.iter().filter(|m| !is_index(&m.media_type)).map(parse) {
        for d in std::iter::once(&v["config"]).chain(v["layers"].as_array().unwrap()) {
            let blob = (d["digest"].as_str().unwrap().to_string(), d["size"].as_u64().unwrap());
            if !blobs.contains(&blob) {
                blobs.push(blob);
            }
        }
    }
    let (manifest_digest, media_type, tag) = (top.digest.clone(), top.media_type.clone(), "v1".to_string());
    TestImage { repo, tag, manifest_digest, media_type, manifests, blobs, layout }
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

fn parse(m: &Manifest) -> Value {
    serde_json::from_slice(&m.bytes).expect("manifest JSON")
}

fn get_manifest(registry: &Registry, repo: &str, reference: &str) -> Manifest {
    let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
    let uri = format!("/v2/{repo}/manifests/{reference}");
    let r = http(&registry.host(), "GET", &uri, &[("Accept", &accept)], b"").expect("GET manifest");
    assert_eq!(r.status, 200, "GET {uri}: {}", String::from_utf8_lossy(&r.body));
    let digest = sha256(&r.body);
    assert_eq!(r.header("Docker-Content-Digest"), Some(digest.as_str()), "GET {uri}: digest header");
    if reference.starts_with("sha256:") {
        assert_eq!(reference, digest, "GET {uri}: body digest");
    }
    let media_type = r.header("Content-Type").expect("Content-Type").to_string();
    Manifest { digest, media_type, bytes: r.body }
}

fn build_multi(dir: &Path) {
    let l = Layout::new(dir);
    let common = l.layer(true, &[("etc/os-release", b"ID=wharf-test\n".to_vec())]);
    let mut platforms = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layers = vec![common.clone()];
        layers.push(l.layer(true, &[(&format!("bin/hello-{arch}"), pseudo_random(arch, 6000))]));
        if arch == "amd64" {
            layers.push(l.layer(false, &[("app/data.txt", format!("data for {arch}\n").into_bytes())]));
        }
        let mut d = l.image_manifest(arch, &layers);
        d["platform"] = json!({ "architecture": arch, "os": "linux" });
        platforms.push(d);
    }
    let index = l.json(OCI_INDEX, &json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": platforms }));
    l.finish(index);
}

fn build_docker(dir: &Path) {
    let l = Layout::new(dir);
    let a = l.layer(true, &[("docker/a.txt", b"first docker layer\n".to_vec())]);
    let b = l.layer(true, &[("docker/b.bin", pseudo_random("docker", 3000))]);
    let manifest = l.image_manifest("amd64", &[a, b]);
    l.finish(manifest);
}

fn build_big(dir: &Path) {
    let l = Layout::new(dir);
    let small = l.layer(true, &[("big/README", b"a small layer next to a big one\n".to_vec())]);
    let big = l.big_layer("big/random.bin", BIG_DATA);
    let manifest = l.image_manifest("amd64", &[small, big]);
    l.finish(manifest);
}

/// A layer descriptor plus the layer's diff_id (sha256 of the uncompressed tar).
#[derive(Clone)]
struct Layer {
    descriptor: Value,
    diff_id: String,
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf() }
    }

    fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let digest = sha256(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(&digest[7..]), bytes).expect("write blob");
        json!({ "mediaType": media_type, "digest": digest, "size": bytes.len() })
    }

    fn json(&self, media_type: &str, value: &Value) -> Value {
        self.blob(media_type, &serde_json::to_vec(value).unwrap())
    }

    fn layer(&self, gzip: bool, files: &[(&str, Vec<u8>)]) -> Layer {
        let mut tar = Vec::new();
        for (name, data) in files {
            tar.extend(tar_header(name, data.len() as u64));
            tar.extend(data);
            tar.resize(tar.len().next_multiple_of(512), 0);
        }
        tar.extend([0u8; 1024]);
        let diff_id = sha256(&tar);
        let descriptor = if gzip { self.blob(LAYER_GZIP, &gzip_stored(&tar)) } else { self.blob(LAYER_TAR, &tar) };
        Layer { descriptor, diff_id }
    }

    /// An uncompressed layer holding one file of `size` bytes from /dev/urandom, streamed to disk and hashed
    /// in one pass, 1 MiB at a time.
    fn big_layer(&self, name: &str, size: u64) -> Layer {
        assert_eq!(size % (1 << 20), 0);
        let tmp = self.dir.join("blobs/big.tmp");
        let mut out = std::fs::File::create(&tmp).expect("create big layer");
        let (mut hasher, mut random) = (Sha256::new(), std::fs::File::open("/dev/urandom").unwrap());
        let mut put = |bytes: &[u8]| {
            hasher.update(bytes);
            out.write_all(bytes).expect("write big layer");
        };
        put(&tar_header(name, size));
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size >> 20 {
            random.read_exact(&mut buf).expect("read /dev/urandom");
            put(&buf);
        }
        put(&[0u8; 1024]);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        std::fs::rename(&tmp, self.dir.join("blobs/sha256").join(&digest[7..])).unwrap();
        let descriptor = json!({ "mediaType": LAYER_TAR, "digest": digest, "size": size + 512 + 1024 });
        Layer { descriptor, diff_id: digest }
    }

    fn image_manifest(&self, arch: &str, layers: &[Layer]) -> Value {
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": { "Cmd": ["/bin/true"], "Labels": { "wharf.test": self.dir.file_name().unwrap().to_str() } },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>() },
        });
        let manifest = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": self.json(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
        });
        self.json(OCI_MANIFEST, &manifest)
    }

    fn finish(&self, mut top: Value) {
        top["annotations"] = json!({ "org.opencontainers.image.ref.name": "v1" });
        let index = json!({ "schemaVersion": 2, "manifests": [top] });
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// A ustar header for a regular file (mode 0644, mtime 0).
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, s: &str| h[at..at + s.len()].copy_from_slice(s.as_bytes());
    assert!(name.len() < 100);
    field(&mut h, 0, name);
    field(&mut h, 100, "0000644\0");
    field(&mut h, 108, "0000000\0");
    field(&mut h, 116, "0000000\0");
    field(&mut h, 124, &format!("{size:011o}\0"));
    field(&mut h, 136, "00000000000\0");
    field(&mut h, 148, "        ");
    h[156] = b'0';
    field(&mut h, 257, "ustar\0");
    field(&mut h, 263, "00");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    field(&mut h, 148, &format!("{sum:06o}\0 "));
    h
}

/// gzip (RFC 1952) of `data` using stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks: Vec<&[u8]> = data.chunks(65535).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, chunk) in chunks.iter().enumerate() {
        out.push((i + 1 == chunks.len()) as u8);
        let len = chunk.len() as u16;
        out.extend(len.to_le_bytes());
        out.extend((!len).to_le_bytes());
        out.extend(*chunk);
    }
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    out.extend((!crc).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

/// `len` deterministic bytes derived from `seed` (so small-image digests are stable across runs).
fn pseudo_random(seed: &str, len: usize) -> Vec<u8> {
    let mut x = u64::from_le_bytes(Sha256::digest(seed.as_bytes())[..8].try_into().unwrap()) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `sha256:HEX` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:HEX` of a file, streamed.
pub fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// A `skopeo` command with a permissive signature policy and an empty registries.conf (host settings
/// cannot interfere); registries are named explicitly as `docker://HOST:PORT/...`.
pub fn skopeo() -> Command {
    static CONFIG: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    super::tools::require("skopeo");
    let (policy, conf) = CONFIG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wharf-skopeo-config");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let tmp = dir.join(format!("{name}.{}", std::process::id())); // other test processes may race
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
            dir.join(name)
        };
        (write("policy.json", r#"{"default":[{"type":"insecureAcceptAnything"}]}"#), write("registries.conf", ""))
    });
    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy").arg(policy).env("CONTAINERS_REGISTRIES_CONF", conf);
    cmd
}

/// Runs `cmd` to completion and returns its output; kills it (by its pid) and panics after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let child = child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().expect("wait for child")));
    rx.recv_timeout(timeout).unwrap_or_else(|_| {
        // SAFETY: kill(2) on our own child, which the waiting thread has not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("{cmd:?} timed out after {timeout:?}\n{}", output_text(&rx.recv().unwrap()))
    })
}

/// [`run`], panicking with the command's output unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run(cmd, timeout);
    assert!(out.status.success(), "{cmd:?} failed ({})\n{}", out.status, output_text(&out));
    out
}

fn output_text(out: &Output) -> String {
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    format!("stdout:\n{o}\nstderr:\n{e}")
}
