//! A real upstream: Debian's `docker-registry` (distribution 2.8) on an ephemeral 127.0.0.1 port.
//!
//! * [`Registry::start`] gives a per-test instance (own tempdir storage), killed on drop.
//! * [`shared`] gives the process-wide instance seeded with the test images of [`super::images`]; it is
//!   started from a dedicated thread that never exits, and its child has `PR_SET_PDEATHSIG=SIGKILL`, so it
//!   dies with the test process. Treat it as read-only (add repositories with `Seeded::alias`, never change
//!   existing ones).
//! * Requests are counted from distribution's access log (gorilla `CombinedLoggingHandler` on stdout, one
//!   line per request: `127.0.0.1 - - [date] "GET /v2/x/blobs/sha256:.. HTTP/1.1" 200 123 "" "agent"`).
//!   The line is written when the handler returns, so [`Registry::sync`] sends a marker request and waits
//!   for its line before counting.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::images::{self, Seeded};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// One request from the access log.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub status: u16,
    /// Response body bytes sent (the log's size field; 0 for `-`).
    pub bytes: u64,
}

/// A running `docker-registry`.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    access: Arc<Mutex<Vec<Request>>>,
    log: Arc<Mutex<String>>,
    marker: AtomicU64,
}

impl Registry {
    /// A per-test registry with tempdir storage. The child gets `PR_SET_PDEATHSIG`, so drop it on (or
    /// before the end of) the thread that started it, as a test body does.
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("wharf-registry-").tempdir().expect("tempdir");
        let mut r = Registry::start_in(dir.path());
        r._tempdir = Some(dir);
        r
    }

    /// Starts a registry whose config and storage live in `dir` (created if missing).
    pub fn start_in(dir: &Path) -> Registry {
        Registry::launch(dir, &dir.join("storage"), None)
    }

    /// A second registry over `storage` (another registry's, so it holds the same images) where every
    /// request needs `user`'s Basic credentials (htpasswd auth): a private registry.
    pub fn start_private(storage: &Path, user: &str, password: &str) -> Registry {
        let dir = tempfile::Builder::new().prefix("wharf-private-registry-").tempdir().expect("tempdir");
        let htpasswd = dir.path().join("htpasswd");
        // bcrypt, the only scheme distribution's htpasswd accepts, at the lowest cost: the registry checks it
        // on every request.
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
        let mut r = Registry::launch(dir.path(), storage, Some(&htpasswd));
        r._tempdir = Some(dir);
        r
    }

    fn launch(dir: &Path, root: &Path, htpasswd: Option<&Path>) -> Registry {
        super::tools::require("docker-registry");
        let root = root.to_path_buf();
        std::fs::create_dir_all(&root).expect("create registry storage");
        let config = dir.join("config.yml");
        let mut yaml = config_yaml(&root);
        if let Some(h) = htpasswd {
            yaml.push_str(&format!("auth:\n  htpasswd:\n    realm: private\n    path: {}\n", h.display()));
        }
        std::fs::write(&config, yaml).expect("write registry config");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key); // distribution lets REGISTRY_* override the config file
            }
        }
        let mut child = spawn_tied(cmd).expect("spawn docker-registry");
        let (access, log) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(String::new())));
        let stdout = child.stdout.take().unwrap();
        let access2 = access.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(req) = parse_access_line(&line) {
                    access2.lock().unwrap().push(req);
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    let _ = tx.send(port.parse::<u16>().unwrap_or(0));
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).unwrap_or(0);
        let mut reg =
            Registry { child: Some(child), port, root, _tempdir: None, access, log, marker: AtomicU64::new(0) };
        assert!(port != 0, "docker-registry did not report its port:\n{}", reg.log());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http(&reg.host(), "GET", "/v2/", &[], b"") {
                Ok(r) if r.status == 200 || (htpasswd.is_some() && r.status == 401) => break,
                _ if Instant::now() > deadline => {
                    reg.kill();
                    panic!("docker-registry on port {port} never answered GET /v2/:\n{}", reg.log());
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        reg
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's own log (stderr: logrus lines with errors and `response completed` records).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The storage root (another registry can serve the same images from it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the registry keeps blob `digest` (`sha256:...`): the exact bytes it serves.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.root.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Waits until every request answered before this call is in the access log (marker request).
    pub fn sync(&self) {
        let n = self.marker.fetch_add(1, Ordering::Relaxed);
        let uri = format!("/v2/?wharf-it-sync={}-{n}", std::process::id());
        let r = http(&self.host(), "GET", &uri, &[], b"").expect("registry sync request");
        assert_eq!(r.status, 200, "registry sync request");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.access.lock().unwrap().iter().any(|r| r.uri == uri) {
            assert!(Instant::now() < deadline, "registry access log never showed {uri}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every request served so far (after [`Registry::sync`]), sync markers excluded.
    pub fn requests(&self) -> Vec<Request> {
        self.sync();
        let all = self.access.lock().unwrap();
        all.iter().filter(|r| !r.uri.contains("wharf-it-sync=")).cloned().collect()
    }

    /// How many `method` requests whose path+query contains `path_contains` were served.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.requests().iter().filter(|r| r.method == method && r.uri.contains(path_contains)).count()
    }

    /// Body bytes sent for `GET` requests whose path contains `path_contains`.
    pub fn bytes_sent(&self, path_contains: &str) -> u64 {
        self.requests().iter().filter(|r| r.method == "GET" && r.uri.contains(path_contains)).map(|r| r.bytes).sum()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- docker-registry log (last 40 lines) ----");
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn config_yaml(root: &Path) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:0\n  secret: wharf-integration-tests\n",
        root.display()
    )
}

/// Parses `HOST - - [date] "METHOD URI PROTO" STATUS SIZE "referer" "agent"`.
fn parse_access_line(line: &str) -> Option<Request> {
    let mut quoted = line.splitn(3, '"');
    quoted.next()?;
    let mut request = quoted.next()?.split(' ');
    let (method, uri) = (request.next()?.to_string(), request.next()?.to_string());
    let mut fields = quoted.next()?.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    Some(Request { method, uri, status, bytes })
}

/// Spawns `cmd` so that the child gets SIGKILL when the test process exits, however it exits. The kernel
/// ties the signal to the thread that forks, so every child is forked by one thread that lives as long as
/// the process: forked from a test's own thread (or tokio's blocking pool, whose idle threads exit after
/// 10 s), a server would be killed in the middle of a longer test.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, back) in rx {
                    let _ = back.send(cmd.spawn());
                }
            })
            .expect("spawn the child-spawner thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (back, child) = mpsc::channel();
    spawner.lock().unwrap().send((cmd, back)).expect("the child-spawner thread is gone");
    child.recv().expect("the child-spawner thread is gone")
}

/// A response from [`http`].
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One blocking HTTP/1.0 request to `host` (so the server closes the connection and never uses chunked
/// encoding). Small and synchronous on purpose: harness code runs outside any async runtime.
pub fn http(host: &str, method: &str, uri: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {uri} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok());
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok(Response { status: status.ok_or_else(|| bad("bad status line"))?, headers, body: raw[end + 4..].to_vec() })
}

static SHARED: OnceLock<Result<Seeded, String>> = OnceLock::new();
static SHARED_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The process-wide registry seeded with the test images (see [`super::images::seed`]); the first caller
/// seeds it, the others wait. Its files live in `$CARGO_TARGET_TMPDIR/wharf-seed-PID` and are removed at
/// process exit (and, if a run was killed, by the next run).
pub fn shared() -> &'static Seeded {
    let seeded = SHARED.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("shared-registry".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(|| {
                    let dir = shared_dir();
                    let started = Instant::now();
                    let registry = Registry::start_in(&dir.join("registry"));
                    let seeded = images::seed(registry, &dir.join("layouts"));
                    eprintln!("shared registry seeded in {:.1?}", started.elapsed());
                    seeded
                });
                let _ = tx.send(result.map_err(|e| {
                    let msg = e.downcast_ref::<String>().cloned();
                    msg.or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
                }));
                // PR_SET_PDEATHSIG fires when this thread exits: never let it.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn shared-registry thread");
        rx.recv().unwrap_or_else(|_| Err("shared-registry thread died".into()))
    });
    match seeded {
        Ok(s) => s,
        Err(e) => panic!("seeding the shared registry failed: {e}"),
    }
}

fn shared_dir() -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = std::fs::read_dir(base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("wharf-seed-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path()); // left behind by a killed run
            }
        }
    }
    let dir = base.join(format!("wharf-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create shared seed dir");
    SHARED_DIR.set(dir.clone()).expect("shared dir set twice");
    extern "C" fn remove_shared_dir() {
        if let Some(d) = SHARED_DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    // SAFETY: registering a plain extern "C" fn with no captured state.
    unsafe { libc::atexit(remove_shared_dir) };
    dir
}
