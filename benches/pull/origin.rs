//! The origin: Debian's `docker-registry` (distribution 2.8) with filesystem storage, and the images seeded
//! into it through the registry HTTP API.
//!
//! * [`Registry`] runs `docker-registry serve config.yml` on a free 127.0.0.1 port, as the origin or (with
//!   `proxy.remoteurl`) as the reference pull-through cache peer. Logging is at `warn` with the access log
//!   off, like nginx's `access_log off`, so no peer pays for per-request log lines.
//! * [`seed`] generates fixed random (incompressible, seeded: same digests every run) layers, pushes each
//!   blob with `POST /blobs/uploads/` + monolithic `PUT ?digest=` streamed from a file (or a cross-repository
//!   mount for shared layers), then `PUT`s one OCI manifest per image. Layer files are deleted once pushed:
//!   the registry's own copy is the one every peer serves.

use crate::procs::{Proc, free_port};
use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// What containerd sends when resolving a tag.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, */*";

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A blob as stored in the origin.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// One seeded image.
#[derive(Clone, Debug)]
pub struct Image {
    pub repo: String,
    pub tag: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Image {
    /// Config first, then the layers.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config).chain(self.layers.iter()).collect()
    }

    /// Manifest + config + layers: what one pull transfers.
    pub fn bytes(&self) -> u64 {
        self.manifest.len() as u64 + self.blobs().iter().map(|b| b.size).sum::<u64>()
    }
}

/// Unique bytes (manifests and distinct blobs) of a set of images.
pub fn unique_bytes(images: &[&Image]) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for img in images {
        total += img.manifest.len() as u64;
        for b in img.blobs() {
            if seen.insert(b.digest.clone()) {
                total += b.size;
            }
        }
    }
    total
}

/// Layer sizes of the seeded images.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// `bench/app:v1`: the first layer, then the others.
    pub app: Vec<u64>,
    /// `bench/large:v1`: one layer.
    pub large: u64,
    /// `bench/huge:v1`: one layer (optional).
    pub huge: Option<u64>,
    /// `bench/cri:v1` (scenario 12, optional): one layer that is a real tar holding one file of this many
    /// random bytes, so that containerd can unpack it (the other layers are bare random bytes).
    pub cri: Option<u64>,
    /// `bench/many-NN:v1` repositories (5 layers each, 3 of them shared).
    pub many_repos: usize,
}

/// Everything seeded.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub app: Image,
    pub large: Image,
    pub huge: Option<Image>,
    /// Scenario 12's image (see [`Sizes::cri`]).
    pub cri: Option<Image>,
    pub many: Vec<Image>,
}

impl Catalog {
    /// Every image.
    pub fn all(&self) -> Vec<&Image> {
        let mut v = vec![&self.app, &self.large];
        v.extend(self.huge.as_ref());
        v.extend(self.cri.as_ref());
        v.extend(self.many.iter());
        v
    }
}

/// A running `docker-registry`.
pub struct Registry {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// Storage root (`rootdirectory`).
    pub root: PathBuf,
}

impl Registry {
    /// Starts a registry with its config and storage in `dir`; `proxy_remote` makes it a pull-through cache.
    pub async fn start(dir: &Path, proxy_remote: Option<&str>) -> Registry {
        let root = dir.join("storage");
        std::fs::create_dir_all(&root).expect("create registry storage");
        let port = free_port();
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: wharf-bench\n",
            root.display()
        );
        if let Some(remote) = proxy_remote {
            yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config = dir.join("config.yml");
        std::fs::write(&config, yaml).expect("write registry config");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let name = if proxy_remote.is_some() { "registry-proxy" } else { "origin" };
        let proc = Proc::spawn(name, cmd, None);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let reg = Registry { proc, addr, root };
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http.get(format!("{}/v2/", reg.url())).send().await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => {
                    panic!("{name} never answered GET /v2/:\n{}", reg.proc.log_tail(40))
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
        reg
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the registry keeps a committed blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.root, digest)
    }
}

/// `<root>/docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`.
pub fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
}

/// Seeds `origin` with the images of `sizes`; layer files are generated under `scratch` and removed.
pub async fn seed(origin: &Registry, sizes: &Sizes, scratch: &Path) -> Catalog {
    std::fs::create_dir_all(scratch).expect("create scratch dir");
    let http = reqwest::Client::builder().no_proxy().build().expect("client");
    let base = origin.url();
    let push = |repo: &'static str, tag: &'static str, layers: Vec<(String, u64)>, tar: bool| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let mut blobs = Vec::new();
            for (seed, size) in layers {
                let path = scratch.join(&seed);
                let blob = generate(&path, &seed, size, tar).await;
                push_file(&http, &base, repo, &blob, &path).await;
                let _ = std::fs::remove_file(&path);
                blobs.push(blob);
            }
            put_image(&http, &base, repo, tag, blobs).await
        }
    };
    let started = Instant::now();
    let app_layers = sizes.app.iter().enumerate().map(|(i, &s)| (format!("app-{i}-{s}"), s)).collect();
    let app = push("bench/app", "v1", app_layers, false).await;
    let large = push("bench/large", "v1", vec![(format!("large-{}", sizes.large), sizes.large)], false).await;
    let huge = match sizes.huge {
        Some(s) => Some(push("bench/huge", "v1", vec![(format!("huge-{s}"), s)], false).await),
        None => None,
    };
    let cri = match sizes.cri {
        Some(s) => Some(push("bench/cri", "v1", vec![(format!("cri-{s}"), s)], true).await),
        None => None,
    };
    let many = seed_many(&http, &base, sizes.many_repos).await;
    eprintln!("bench: origin seeded in {:.1?}", started.elapsed());
    Catalog { app, large, huge, cri, many }
}

/// `bench/many-NN:v1`: layers `base-a` (4 MiB) and `base-b` (3 MiB) shared by every repository, `mid-K`
/// (2 MiB) shared by groups of 10, and two 1 MiB layers of its own.
async fn seed_many(http: &reqwest::Client, base: &str, repos: usize) -> Vec<Image> {
    let shared_a = memory_blob("many-base-a", 4 * MIB);
    let shared_b = memory_blob("many-base-b", 3 * MIB);
    let mids: Vec<(Blob, Bytes)> =
        (0..repos.div_ceil(10)).map(|k| memory_blob(&format!("many-mid-{k}"), 2 * MIB)).collect();
    let mut images = Vec::new();
    let first = "bench/many-00".to_string();
    for i in 0..repos {
        let repo = format!("bench/many-{i:02}");
        let own: Vec<(Blob, Bytes)> = (0..2).map(|j| memory_blob(&format!("many-{i}-own-{j}"), MIB)).collect();
        let mid = &mids[i / 10];
        let mut layers = Vec::new();
        for (blob, data) in [&shared_a, &shared_b, mid, &own[0], &own[1]] {
            if i == 0 || !mount(http, base, &repo, &blob.digest, &first).await {
                push_bytes(http, base, &repo, blob, data.clone()).await;
            }
            layers.push(blob.clone());
        }
        images.push(put_image(http, base, &repo, "v1", layers).await);
    }
    images
}

/// A seeded random blob held in memory (small layers only).
fn memory_blob(seed: &str, size: u64) -> (Blob, Bytes) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed_of(seed));
    let mut data = vec![0u8; size as usize];
    rng.fill_bytes(&mut data);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    (Blob { digest, size }, Bytes::from(data))
}

fn seed_of(name: &str) -> u64 {
    let h = Sha256::digest(name.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Writes `size` seeded random bytes to `path` (1 MiB at a time, never all in memory) and hashes them; with
/// `tar`, wrapped as the one regular file `data` of an uncompressed tar (the blob is then 1536 bytes and
/// the padding to 512 longer than `size`).
async fn generate(path: &Path, seed: &str, size: u64, tar: bool) -> Blob {
    let (path, seed) = (path.to_path_buf(), seed.to_string());
    tokio::task::spawn_blocking(move || {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed_of(&seed));
        let mut file = std::io::BufWriter::with_capacity(MIB as usize, std::fs::File::create(&path).expect("create"));
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut put = |bytes: &[u8]| {
            hasher.update(bytes);
            file.write_all(bytes).expect("write layer");
            total += bytes.len() as u64;
        };
        if tar {
            put(&tar_header("data", size));
        }
        let mut buf = vec![0u8; MIB as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(MIB) as usize;
            rng.fill_bytes(&mut buf[..n]);
            put(&buf[..n]);
            left -= n as u64;
        }
        if tar {
            // Padding to a whole record, then the two zero records that end an archive.
            put(&vec![0u8; (size.next_multiple_of(512) - size) as usize + 1024]);
        }
        file.flush().expect("flush layer");
        Blob { digest: format!("sha256:{}", hex::encode(hasher.finalize())), size: total }
    })
    .await
    .expect("generate task")
}

/// A ustar header for a regular file `name` (mode 0644, owner 0, mtime 0) of `size` bytes.
fn tar_header(name: &str, size: u64) -> [u8; 512] {
    assert!(name.len() < 100 && size < 1 << 33, "tar header: name or size too long for ustar");
    let mut h = [0u8; 512];
    let mut field = |at: usize, value: &[u8]| h[at..at + value.len()].copy_from_slice(value);
    field(0, name.as_bytes());
    field(100, b"0000644\0");
    field(108, b"0000000\0");
    field(116, b"0000000\0");
    field(124, format!("{size:011o}\0").as_bytes());
    field(136, b"00000000000\0");
    field(156, b"0");
    field(257, b"ustar\0");
    field(263, b"00");
    // The checksum is the byte sum with its own field counted as eight spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// `POST /v2/<repo>/blobs/uploads/?mount=..&from=..`; true if the registry mounted it (201).
async fn mount(http: &reqwest::Client, base: &str, repo: &str, digest: &str, from: &str) -> bool {
    let url = format!("{base}/v2/{repo}/blobs/uploads/?mount={digest}&from={from}");
    matches!(http.post(url).send().await, Ok(r) if r.status().as_u16() == 201)
}

/// Starts an upload session; the URL to `PUT` to (with `digest=` appended).
async fn start_upload(http: &reqwest::Client, base: &str, repo: &str, digest: &str) -> String {
    let r = http.post(format!("{base}/v2/{repo}/blobs/uploads/")).send().await.expect("POST upload");
    assert_eq!(r.status().as_u16(), 202, "POST /v2/{repo}/blobs/uploads/");
    let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).expect("upload Location").to_string();
    let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

async fn push_bytes(http: &reqwest::Client, base: &str, repo: &str, blob: &Blob, data: Bytes) {
    let url = start_upload(http, base, repo, &blob.digest).await;
    let r = http.put(url).header("content-type", "application/octet-stream").body(data).send().await.expect("PUT blob");
    assert_eq!(r.status().as_u16(), 201, "PUT blob {} to {repo}", blob.digest);
}

/// Monolithic `PUT` streamed from `path` in 1 MiB reads.
async fn push_file(http: &reqwest::Client, base: &str, repo: &str, blob: &Blob, path: &Path) {
    let url = start_upload(http, base, repo, &blob.digest).await;
    let file = tokio::fs::File::open(path).await.expect("open layer file");
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; MIB as usize];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let r = http
        .put(url)
        .header("content-type", "application/octet-stream")
        .header("content-length", blob.size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("PUT blob");
    assert_eq!(r.status().as_u16(), 201, "PUT blob {} to {repo}", blob.digest);
}

/// Pushes a config naming `layers` and the OCI manifest; returns the image as the registry stores it.
async fn put_image(http: &reqwest::Client, base: &str, repo: &str, tag: &str, layers: Vec<Blob>) -> Image {
    let config_json = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Labels": { "bench.image": format!("{repo}:{tag}") } },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>() },
    });
    let config_bytes = serde_json::to_vec(&config_json).expect("config json");
    let config = Blob {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&config_bytes))),
        size: config_bytes.len() as u64,
    };
    push_bytes(http, base, repo, &config, Bytes::from(config_bytes)).await;
    let desc = |media: &str, b: &Blob| serde_json::json!({ "mediaType": media, "digest": b.digest, "size": b.size });
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(OCI_CONFIG, &config),
        "layers": layers.iter().map(|l| desc(LAYER_TAR, l)).collect::<Vec<_>>(),
    }))
    .expect("manifest json");
    let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    let r = http
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(r.status().as_u16(), 201, "PUT manifest {repo}:{tag}");
    Image { repo: repo.to_string(), tag: tag.to_string(), manifest, manifest_digest, config, layers }
}
