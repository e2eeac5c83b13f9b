//! Scenario 12's container runtime and page-cache tools.
//!
//! * [`Containerd`]: Debian's `containerd` (1.6) as a child with the CRI plugin on, image service only (the
//!   native snapshotter, no CNI), resolving registries through a hosts directory as a node's `config_path`
//!   does, and a CRI client on its socket (`PullImage`, `RemoveImage`) as the kubelet uses it.
//! * [`evict`], [`read_in`], [`resident`]: a file's pages dropped from the page cache, read into it, counted.
//!
//! The config file and `hosts.toml` come from tests/it/support/containerd_files.rs, which the tests use too
//! (included here by path: a bench cannot import the tests' harness). containerd's root
//! (content store and snapshots, GiB of them) is under the run directory, so it goes with the run even when
//! the bench is killed; its state directory holds the gRPC socket and so is under /tmp (unix socket paths are
//! limited to 108 bytes).

#[path = "../../tests/it/support/containerd_files.rs"]
mod containerd_files;
use crate::procs::{self, Proc};
use containerd_files::config_toml;
pub use containerd_files::write_hosts_dir as write_hosts;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest, RemoveImageRequest, VersionRequest};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// The containerd namespace of everything CRI does.
const CRI_NAMESPACE: &str = "k8s.io";

/// None if containerd can be started, else why not.
pub fn missing() -> Option<String> {
    (!crate::installed("containerd")).then(|| "containerd is not installed (apt-get install containerd)".to_string())
}

/// A running containerd (killed on drop, its root and state removed).
pub struct Containerd {
    /// The daemon (its CPU goes into the run figures; its log is kept).
    pub proc: Proc,
    root: PathBuf,
    state: PathBuf,
    channel: Channel,
    /// `containerd 1.6.20~ds1`, as CRI `Version` answers.
    pub version: String,
}

impl Containerd {
    /// Starts containerd with its root in `root` and registries resolved through `hosts` (one
    /// `<registry>/hosts.toml` each); waits until CRI `Version` answers.
    pub async fn start(root: &Path, hosts: &Path) -> Result<Containerd, String> {
        let state = PathBuf::from(format!("/tmp/wharf-bench-ctd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        for d in [root.join("tmp"), state.clone()] {
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let config = root.join("config.toml");
        std::fs::write(&config, config_toml(root, &state, Some(hosts))).map_err(|e| format!("write config: {e}"))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let proc = Proc::spawn("containerd", cmd, None);
        let socket = state.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists()
                && let Ok(channel) = connect(&socket).await
            {
                let mut client = RuntimeServiceClient::new(channel.clone());
                let asked = client.version(VersionRequest { version: "v1".into() });
                if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(5), asked).await {
                    let v = v.into_inner();
                    let version = format!("{} {}", v.runtime_name, v.runtime_version);
                    return Ok(Containerd { proc, root: root.to_path_buf(), state, channel, version });
                }
            }
            if Instant::now() > deadline {
                let _ = std::fs::remove_dir_all(&state);
                return Err(format!("containerd did not answer CRI Version in 30 s:\n{}", proc.log_tail(30)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CRI `PullImage` of `reference`, as the kubelet asks for it; the image id.
    pub async fn pull(&self, reference: &str) -> Result<String, String> {
        let mut client = ImageServiceClient::new(self.channel.clone());
        let request = PullImageRequest { image: Some(spec(reference)), auth: None, sandbox_config: None };
        match tokio::time::timeout(Duration::from_secs(900), client.pull_image(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner().image_ref),
            Ok(Err(status)) => Err(format!("PullImage {reference}: {status}")),
            Err(_) => Err(format!("PullImage {reference}: no answer in 900 s")),
        }
    }

    /// CRI `RemoveImage` of `image` (a reference or an id; absent is fine). containerd deletes every name of
    /// the image and collects its content and snapshots before it answers.
    pub async fn remove(&self, image: &str) -> Result<(), String> {
        let mut client = ImageServiceClient::new(self.channel.clone());
        let request = RemoveImageRequest { image: Some(spec(image)) };
        match tokio::time::timeout(Duration::from_secs(120), client.remove_image(request)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(()),
            Ok(Err(status)) => Err(format!("RemoveImage {image}: {status}")),
            Err(_) => Err(format!("RemoveImage {image}: no answer in 120 s")),
        }
    }

    /// Where the content store keeps `digest` once a fetch has committed it.
    pub fn content_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root.join("root/io.containerd.content.v1.content/blobs/sha256").join(hex)
    }

    /// What in containerd still holds `digest` or an unpacked layer: the committed blob (on disk and in
    /// `ctr content ls`), a download in progress, native snapshots. Empty when a pull must download it again.
    pub fn leftovers(&self, digest: &str) -> Vec<String> {
        let mut found = Vec::new();
        if self.content_path(digest).exists() {
            found.push("the layer's file in the content store".to_string());
        }
        let entries = |dir: &str| std::fs::read_dir(self.root.join(dir)).map(|d| d.count()).unwrap_or(0);
        let ingests = entries("root/io.containerd.content.v1.content/ingest");
        if ingests > 0 {
            found.push(format!("{ingests} downloads in progress"));
        }
        let snapshots = entries("root/io.containerd.snapshotter.v1.native/snapshots");
        if snapshots > 0 {
            found.push(format!("{snapshots} native snapshots"));
        }
        let mut ctr = Command::new("ctr");
        ctr.arg("--address").arg(self.state.join("containerd.sock"));
        ctr.args(["--namespace", CRI_NAMESPACE, "content", "ls", "-q"]);
        let (ok, out, err) = procs::run_output(ctr, Duration::from_secs(30));
        if !ok {
            found.push(format!("`ctr content ls` failed: {}", err.trim()));
        } else if out.lines().any(|l| l.trim() == digest) {
            found.push("the layer in `ctr content ls`".to_string());
        }
        found
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.proc.stop(libc::SIGKILL, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.into(), ..ImageSpec::default() }
}

/// A gRPC channel over the unix socket (the pattern of wharf's `runtime::Runtime::connect`).
async fn connect(socket: &Path) -> Result<Channel, String> {
    let socket = socket.to_path_buf();
    // The URI is a placeholder: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://[::]:50051");
    let connecting =
        endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }));
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no connection in 5 s".into()),
    }
}

/// Drops `path`'s pages from the page cache (`POSIX_FADV_DONTNEED`: clean, unmapped pages only).
pub fn evict(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: a valid open descriptor; the call only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(rc)) }
}

/// Reads `path` to the end, so its pages are in the page cache.
pub fn read_in(path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}

/// The fraction of `path`'s pages in the page cache (`mincore(2)` on a mapping of it, which does no I/O).
pub fn resident(path: &Path) -> std::io::Result<f64> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a read-only shared mapping of an open file, never read through, unmapped before returning;
    // `vec` has one byte per page of it.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let rc = libc::mincore(addr, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(addr, len);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64)
}

/// `sync`, then `echo 1 > /proc/sys/vm/drop_caches`: every clean page of the page cache (root only).
pub fn drop_caches() -> std::io::Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "1")
}
