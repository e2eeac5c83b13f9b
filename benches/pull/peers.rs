//! The servers a client can pull from, all on 127.0.0.1, and their cold/warm life cycle.
//!
//! * `wharf`: the binary cargo built (`CARGO_BIN_EXE_wharf`, or `$WHARF_BENCH_BIN` to measure another build),
//!   copied into the run directory first so that a concurrent `cargo build` cannot swap it mid-run; upstream
//!   `origin.test=http://SHIM`.
//! * `registry-proxy`: `docker-registry` with `proxy.remoteurl: http://SHIM`, the reference pull-through cache.
//! * `nginx`: `sendfile on`, serving the origin's blob files in place (a regex location + `alias` maps
//!   `/v2/<name>/blobs/sha256:<hex>` to `<root>/docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`) and the
//!   manifests as static files: the upper bound for serving a cached blob (never cold).
//! * `direct`: the origin through the shim (no cache). Its "server" figures are the origin's.
//! * `cluster` and `independent` (scenario 8): three wharf instances on 127.0.0.2, .3 and .4 (any 127/8
//!   address binds without setup), each with its own data directory; `cluster` adds `--peer-listen`,
//!   `--peers` (all three) and `--peer-key-file`, `independent` leaves them out. Peer traffic goes straight
//!   from node to node, so the shim still sees only the upstream.
//! * `bucket` (scenario 9): one wharf like `wharf`, plus `--config FILE` whose `[storage.s3]` names the
//!   scenario's S3 server ([`Peers::set_bucket_config`]); its own slot, so it can run beside `wharf`.
//!
//! [`Peers::cold`] gives a caching peer with an empty cache (stopped, new data directory, started again).

use crate::origin::{Catalog, Registry};
use crate::procs::{self, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Which server. The order is the order of rows within a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKind {
    /// Three wharf instances forming a cluster.
    Cluster,
    /// Three wharf instances that know nothing of each other.
    Independent,
    /// One wharf with the S3 bucket tier below its disk.
    Bucket,
    Wharf,
    Proxy,
    Nginx,
    Direct,
}

impl PeerKind {
    /// Name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Wharf => "wharf",
            PeerKind::Proxy => "registry-proxy",
            PeerKind::Nginx => "nginx",
            PeerKind::Direct => "direct",
            PeerKind::Cluster => "wharf cluster (3 nodes)",
            PeerKind::Independent => "3 wharfs, no cluster",
            PeerKind::Bucket => "wharf + bucket",
        }
    }

    /// Parses a name from `--peers`.
    pub fn parse(s: &str) -> Option<PeerKind> {
        match s {
            "wharf" => Some(PeerKind::Wharf),
            "proxy" | "registry-proxy" => Some(PeerKind::Proxy),
            "nginx" => Some(PeerKind::Nginx),
            "direct" => Some(PeerKind::Direct),
            "cluster" => Some(PeerKind::Cluster),
            "independent" => Some(PeerKind::Independent),
            "bucket" => Some(PeerKind::Bucket),
            _ => None,
        }
    }
}

/// A server to point clients at.
#[derive(Clone, Debug)]
pub struct Target {
    pub kind: PeerKind,
    pub url: String,
    /// Every node's client API (`url` first); clients are spread over them.
    pub urls: Vec<String>,
    /// The nodes' peer addresses (`ip:port`, in `urls` order); empty unless `kind` is a cluster.
    pub peer_addrs: Vec<String>,
    /// Processes whose CPU and RSS count as the server's (nginx: master and workers).
    pub pids: Vec<i32>,
}

impl Target {
    fn single(kind: PeerKind, url: String, pids: Vec<i32>) -> Target {
        Target { kind, urls: vec![url.clone()], url, peer_addrs: Vec::new(), pids }
    }
}

struct WharfProc {
    proc: Proc,
    url: String,
    dir: PathBuf,
}

/// Three wharf instances, clustered or not.
struct Trio {
    kind: PeerKind,
    nodes: Vec<WharfProc>,
    /// Peer addresses (cluster only).
    peers: Vec<String>,
}

struct Nginx {
    proc: Proc,
    port: u16,
    workers: Vec<i32>,
}

/// Every peer's process, started on demand.
pub struct Peers {
    run_dir: PathBuf,
    shim_url: String,
    origin_pid: i32,
    origin_root: PathBuf,
    manifests_dir: PathBuf,
    request_log: bool,
    wharf_bin: PathBuf,
    seq: u32,
    wharf: Option<WharfProc>,
    /// The `bucket` peer and the config file it starts with.
    bucket_wharf: Option<WharfProc>,
    bucket_config: Option<PathBuf>,
    trio: Option<Trio>,
    proxy: Option<(Registry, PathBuf)>,
    nginx: Option<Nginx>,
    /// Highest `VmHWM` (KiB) of any wharf instance stopped so far.
    pub wharf_hwm_kib: u64,
}

impl Peers {
    /// Writes the static manifests nginx serves; starts nothing yet.
    pub fn new(run_dir: &Path, shim_url: &str, origin: &Registry, catalog: &Catalog, request_log: bool) -> Peers {
        let manifests_dir = run_dir.join("nginx-manifests");
        for img in catalog.all() {
            let dir = manifests_dir.join(&img.repo);
            std::fs::create_dir_all(&dir).expect("create manifests dir");
            std::fs::write(dir.join(&img.tag), &img.manifest).expect("write manifest");
            std::fs::write(dir.join(&img.manifest_digest), &img.manifest).expect("write manifest");
        }
        let wharf_bin = run_dir.join("wharf");
        // WHARF_BENCH_BIN: another build to measure (a before/after comparison in the same conditions).
        let built = std::env::var_os("WHARF_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_wharf").into());
        std::fs::copy(&built, &wharf_bin).expect("copy the wharf binary");
        Peers {
            run_dir: run_dir.to_path_buf(),
            shim_url: shim_url.to_string(),
            origin_pid: origin.proc.pid(),
            origin_root: origin.root.clone(),
            manifests_dir,
            request_log,
            wharf_bin,
            seq: 0,
            wharf: None,
            bucket_wharf: None,
            bucket_config: None,
            trio: None,
            proxy: None,
            nginx: None,
            wharf_hwm_kib: 0,
        }
    }

    /// `kind` with an empty cache: wharf and the proxy are restarted on a new data directory.
    pub async fn cold(&mut self, kind: PeerKind) -> Target {
        self.stop(kind);
        self.current(kind).await
    }

    /// The running instance of `kind` (started if needed; its cache as previous runs left it).
    pub async fn current(&mut self, kind: PeerKind) -> Target {
        match kind {
            PeerKind::Wharf => {
                if self.wharf.is_none() {
                    self.wharf = Some(self.start_wharf());
                }
                let w = self.wharf.as_ref().expect("wharf");
                Target::single(kind, w.url.clone(), vec![w.proc.pid()])
            }
            PeerKind::Bucket => {
                if self.bucket_wharf.is_none() {
                    let config = self.bucket_config.clone().expect("set_bucket_config before the bucket peer");
                    let extra = ["--config".to_string(), config.display().to_string()];
                    self.bucket_wharf = Some(self.spawn_wharf("127.0.0.1", &extra));
                }
                let w = self.bucket_wharf.as_ref().expect("bucket wharf");
                Target::single(kind, w.url.clone(), vec![w.proc.pid()])
            }
            PeerKind::Proxy => {
                if self.proxy.is_none() {
                    self.seq += 1;
                    let dir = self.run_dir.join(format!("proxy-{}", self.seq));
                    self.proxy = Some((Registry::start(&dir, Some(&self.shim_url)).await, dir));
                }
                let (p, _) = self.proxy.as_ref().expect("proxy");
                Target::single(kind, p.url(), vec![p.proc.pid()])
            }
            PeerKind::Nginx => {
                if self.nginx.is_none() {
                    self.nginx = Some(self.start_nginx().await);
                }
                let n = self.nginx.as_ref().expect("nginx");
                let mut pids = vec![n.proc.pid()];
                pids.extend(&n.workers);
                Target::single(kind, format!("http://127.0.0.1:{}", n.port), pids)
            }
            PeerKind::Direct => Target::single(kind, self.shim_url.clone(), vec![self.origin_pid]),
            PeerKind::Cluster | PeerKind::Independent => {
                if self.trio.as_ref().is_none_or(|t| t.kind != kind) {
                    self.stop_trio();
                    self.trio = Some(self.start_trio(kind).await);
                }
                let t = self.trio.as_ref().expect("trio");
                let urls: Vec<String> = t.nodes.iter().map(|n| n.url.clone()).collect();
                Target {
                    kind,
                    url: urls[0].clone(),
                    urls,
                    peer_addrs: t.peers.clone(),
                    pids: t.nodes.iter().map(|n| n.proc.pid()).collect(),
                }
            }
        }
    }

    /// Where the single wharf (if it runs) keeps the committed blob `digest`: `<data dir>/blobs/sha256/<2
    /// hex>/<hex>`, the layout of wharf's `cache::store`.
    pub fn wharf_blob_path(&self, digest: &str) -> Option<PathBuf> {
        let w = self.wharf.as_ref()?;
        let hex = digest.trim_start_matches("sha256:");
        Some(w.dir.join("blobs/sha256").join(&hex[..2]).join(hex))
    }

    /// The run directory (removed after the run unless `--keep`).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Writes `toml` (a `[storage.s3]` section) to the run directory: the config file the `bucket` peer is
    /// started with from now on.
    pub fn set_bucket_config(&mut self, toml: &str) {
        let path = self.run_dir.join("bucket.toml");
        std::fs::write(&path, toml).expect("write the bucket config");
        self.bucket_config = Some(path);
    }

    /// Stops `kind` if it runs (wharf and the bucket peer: their data directories are removed).
    pub fn stop(&mut self, kind: PeerKind) {
        match kind {
            PeerKind::Wharf => self.stop_wharf(),
            PeerKind::Bucket => self.stop_bucket_wharf(),
            PeerKind::Proxy => self.stop_proxy(),
            PeerKind::Cluster | PeerKind::Independent => self.stop_trio(),
            PeerKind::Nginx | PeerKind::Direct => {}
        }
    }

    /// True once the proxy has committed every digest to its storage (its fills are background tasks).
    pub fn proxy_has(&self, digests: &[&str]) -> bool {
        let Some((p, _)) = &self.proxy else { return false };
        digests.iter().all(|d| p.blob_path(d).exists())
    }

    fn start_wharf(&mut self) -> WharfProc {
        self.spawn_wharf("127.0.0.1", &[])
    }

    /// Starts one wharf with its client API on `ip:0` and `extra` flags; waits for its start-up line.
    fn spawn_wharf(&mut self, ip: &str, extra: &[String]) -> WharfProc {
        self.seq += 1;
        let dir = self.run_dir.join(format!("wharf-{}", self.seq));
        std::fs::create_dir_all(&dir).expect("create wharf dir");
        let mut cmd = Command::new(&self.wharf_bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("{ip}:0"))
            .arg("--data-dir")
            .arg(&dir)
            .arg("--upstream")
            .arg(format!("origin.test={}", self.shim_url))
            .arg("--default-registry")
            .arg("origin.test")
            .args(extra);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WHARF_") {
                cmd.env_remove(key);
            }
        }
        // Scenario 10 holds more idle connections than the default limit (4096) admits at once.
        cmd.env("WHARF_SERVER__MAX_CONNECTIONS", "65536");
        // The per-request log line is off unless asked for (nginx and the registries log no requests either).
        let filter = if self.request_log { "info" } else { "info,wharf::request=warn" };
        cmd.env("RUST_LOG", filter);
        // The client API's line names the version; a cluster node logs "peer API listening on" first.
        let ready = format!("wharf {} listening on http://", env!("CARGO_PKG_VERSION"));
        let mut proc = Proc::spawn("wharf", cmd, Some(&ready));
        let rest = proc.wait_ready(Duration::from_secs(30));
        let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
        WharfProc { proc, url: format!("http://{addr}"), dir }
    }

    /// Three instances on 127.0.0.2–4 (a cluster of all three, or independent), each answering `/readyz`.
    async fn start_trio(&mut self, kind: PeerKind) -> Trio {
        let key_file = self.run_dir.join("peer-keys");
        std::fs::write(&key_file, "wharf-bench-peer-key-0123456789abcdefghijklmnop\n").expect("write peer key");
        let ips: Vec<String> = (2..=4).map(|i| format!("127.0.0.{i}")).collect();
        let peers: Vec<String> = if kind == PeerKind::Cluster {
            ips.iter().map(|ip| format!("{ip}:{}", procs::free_port_on(ip))).collect()
        } else {
            Vec::new()
        };
        let mut nodes = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let extra: Vec<String> = match peers.get(i) {
                Some(me) => vec![
                    "--peer-listen".into(),
                    me.clone(),
                    "--peers".into(),
                    peers.join(","),
                    "--peer-key-file".into(),
                    key_file.display().to_string(),
                ],
                None => Vec::new(),
            };
            nodes.push(self.spawn_wharf(ip, &extra));
        }
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        for n in &nodes {
            let url = format!("{}/readyz", n.url);
            let mut ready = false;
            for _ in 0..500 {
                if matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(ready, "{} never became ready:\n{}", n.url, n.proc.log_tail(40));
        }
        Trio { kind, nodes, peers }
    }

    fn stop_trio(&mut self) {
        if let Some(t) = self.trio.take() {
            for mut n in t.nodes {
                if self.request_log {
                    eprintln!("bench: {}'s last log lines:\n{}", n.url, n.proc.log_tail(200));
                }
                n.proc.stop(libc::SIGKILL, Duration::from_secs(5));
                self.wharf_hwm_kib = self.wharf_hwm_kib.max(n.proc.final_hwm_kib);
                let _ = std::fs::remove_dir_all(&n.dir);
            }
        }
    }

    /// The connection ramps (`1@0,2@130,…`: requests in flight @ milliseconds) of the single wharf's
    /// ranged fills so far, from its `ranged transfer done` log lines.
    pub fn wharf_ramps(&self) -> Vec<String> {
        let Some(w) = &self.wharf else { return Vec::new() };
        let log = w.proc.log_tail(usize::MAX);
        let ramps = log.lines().filter(|l| l.contains("ranged transfer done"));
        ramps.filter_map(|l| Some(l.split("connections=").nth(1)?.split_whitespace().next()?.to_owned())).collect()
    }

    /// The last log lines of every running wharf (for a failed run's report).
    pub fn wharf_logs(&self, n: usize) -> String {
        let mut out = String::new();
        for w in self.wharf.iter().chain(&self.bucket_wharf).chain(self.trio.iter().flat_map(|t| t.nodes.iter())) {
            out.push_str(&format!("--- {}\n{}\n", w.url, w.proc.log_tail(n)));
        }
        out
    }

    fn stop_wharf(&mut self) {
        let w = self.wharf.take();
        self.stop_single(w);
    }

    fn stop_bucket_wharf(&mut self) {
        let w = self.bucket_wharf.take();
        self.stop_single(w);
    }

    fn stop_single(&mut self, w: Option<WharfProc>) {
        if let Some(mut w) = w {
            if self.request_log {
                eprintln!("bench: {}'s last log lines:\n{}", w.url, w.proc.log_tail(200));
            }
            w.proc.stop(libc::SIGKILL, Duration::from_secs(5));
            self.wharf_hwm_kib = self.wharf_hwm_kib.max(w.proc.final_hwm_kib);
            let _ = std::fs::remove_dir_all(&w.dir);
        }
    }

    /// The highest `VmHWM` (KiB) of one wharf instance so far: stopped instances and the running ones.
    pub fn wharf_peak_kib(&self) -> u64 {
        let running = self.wharf.iter().chain(&self.bucket_wharf).chain(self.trio.iter().flat_map(|t| t.nodes.iter()));
        running.filter_map(|w| procs::rss_kib(w.proc.pid())).map(|r| r.1).fold(self.wharf_hwm_kib, u64::max)
    }

    fn stop_proxy(&mut self) {
        if let Some((mut p, dir)) = self.proxy.take() {
            p.proc.stop(libc::SIGKILL, Duration::from_secs(5));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    async fn start_nginx(&mut self) -> Nginx {
        let dir = self.run_dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp")).expect("create nginx dir");
        let port = procs::free_port();
        // SAFETY: getuid has no preconditions.
        let user = if unsafe { libc::getuid() } == 0 { "user root;\n" } else { "" };
        let blobs = self.origin_root.join("docker/registry/v2/blobs/sha256");
        let conf = format!(
            "{user}daemon off;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
             keepalive_requests 1000000;\n  keepalive_timeout 75s;\n  server_tokens off;\n\
             client_body_temp_path {dir}/tmp/body;\n  proxy_temp_path {dir}/tmp/proxy;\n\
             fastcgi_temp_path {dir}/tmp/fastcgi;\n  uwsgi_temp_path {dir}/tmp/uwsgi;\n  scgi_temp_path {dir}/tmp/scgi;\n\
             server {{\n    listen 127.0.0.1:{port};\n\
             location ~ \"^/v2/(?<repo>.+)/blobs/sha256:(?<p2>[0-9a-f][0-9a-f])(?<rest>[0-9a-f]{{62}})$\" {{\n\
             alias {blobs}/$p2/$p2$rest/data;\n      default_type application/octet-stream;\n    }}\n\
             location ~ \"^/v2/(?<mrepo>.+)/manifests/(?<mref>[^/]+)$\" {{\n\
             alias {manifests}/$mrepo/$mref;\n      default_type application/vnd.oci.image.manifest.v1+json;\n    }}\n\
             location = /v2/ {{ default_type application/json; return 200 '{{}}'; }}\n  }}\n}}\n",
            dir = dir.display(),
            blobs = blobs.display(),
            manifests = self.manifests_dir.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut cmd = Command::new("nginx");
        cmd.arg("-p").arg(&dir).arg("-e").arg(dir.join("error.log")).arg("-c").arg(&conf_path);
        let proc = Proc::spawn("nginx", cmd, None);
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let url = format!("http://127.0.0.1:{port}/v2/");
        let mut workers = Vec::new();
        for _ in 0..300 {
            if matches!(http.get(&url).send().await, Ok(r) if r.status().is_success()) {
                workers = procs::children_of(proc.pid());
                if workers.len() >= 2 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if workers.is_empty() {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            panic!("nginx did not start:\n{}\n{log}", proc.log_tail(20));
        }
        for &w in &workers {
            procs::register(w);
        }
        let listed: String = workers.iter().map(|w| format!("{w}\n")).collect();
        let _ = std::fs::write(self.run_dir.join(procs::ORPHAN_PIDS_FILE), listed);
        Nginx { proc, port, workers }
    }

    /// Stops everything (wharf, proxy, nginx and its workers).
    pub fn stop_all(&mut self) {
        self.stop_wharf();
        self.stop_bucket_wharf();
        self.stop_trio();
        self.stop_proxy();
        if let Some(mut n) = self.nginx.take() {
            n.proc.stop(libc::SIGTERM, Duration::from_secs(5));
            for w in n.workers {
                if Path::new(&format!("/proc/{w}")).exists() {
                    // SAFETY: a worker of the nginx we started that outlived its master.
                    unsafe { libc::kill(w, libc::SIGKILL) };
                }
                procs::unregister(w);
            }
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        self.stop_all();
    }
}
