//! A real `containerd` (1.6, Debian's) as a child process, for pulls through wharf with `ctr`.
//!
//! Root, state and the gRPC socket live in a tempdir under /tmp (unix socket paths are limited to 108
//! bytes); the generated version-2 config disables CRI, the non-native snapshotters, `opt` and tracing,
//! so it starts in well under a second and touches nothing on the host. `ctr content fetch` resolves and
//! fetches client-side (in `ctr`), honours `--hosts-dir` and writes into containerd's content store
//! without unpacking.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::containerd_files::config_toml;
pub use super::containerd_files::write_hosts_dir;
use super::images::{run, run_ok};
use super::registry::spawn_tied;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The containerd namespace every helper uses.
pub const NAMESPACE: &str = "test";

/// A running containerd, killed on drop. The child gets `PR_SET_PDEATHSIG`: drop it on the thread that
/// started it (a test body does).
pub struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers.
    pub fn start() -> Containerd {
        Containerd::start_with(None)
    }

    /// [`Containerd::start`] with the CRI plugin on (image service only: no CNI, the native snapshotter),
    /// resolving registries through `hosts_dir` as a node's `config_path` does.
    pub fn start_with_cri(hosts_dir: &Path) -> Containerd {
        Containerd::start_with(Some(hosts_dir))
    }

    fn start_with(cri_hosts: Option<&Path>) -> Containerd {
        let mut c = Containerd::prepare(cri_hosts);
        c.run();
        c
    }

    /// A containerd with the CRI plugin on (as [`Containerd::start_with_cri`]), configured but not yet
    /// running: its socket path is known before [`Containerd::run`] starts it.
    pub fn prepare_with_cri(hosts_dir: &Path) -> Containerd {
        Containerd::prepare(Some(hosts_dir))
    }

    fn prepare(cri_hosts: Option<&Path>) -> Containerd {
        super::tools::require("containerd");
        super::tools::require("ctr");
        let dir = tempfile::Builder::new().prefix("wharf-ctd-").tempdir_in("/tmp").expect("tempdir");
        let socket = dir.path().join("state/containerd.sock");
        std::fs::write(dir.path().join("config.toml"), config_toml(dir.path(), &dir.path().join("state"), cri_hosts))
            .expect("write config");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("create containerd temp dir");
        Containerd { child: None, dir, socket }
    }

    /// Starts (or restarts, on the same root, state and socket) containerd and waits until `ctr version`
    /// answers.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "containerd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))
            .expect("open log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(self.dir.path().join("config.toml"));
        cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(spawn_tied(cmd).expect("spawn containerd"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited at start-up ({status}):\n{}", self.log());
            }
            if self.socket.exists() && run(self.ctr().arg("version"), Duration::from_secs(10)).status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "containerd did not answer `ctr version`:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills containerd (its files stay, for [`Containerd::run`] again).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://SOCKET`, as a runtime endpoint.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// `ctr --address SOCKET --namespace test`, ready for more arguments.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).arg("--namespace").arg(NAMESPACE);
        cmd
    }

    /// `ctr content fetch --hosts-dir DIR --all-platforms REFERENCE`; returns the output, success or not.
    pub fn fetch(&self, hosts_dir: &Path, reference: &str) -> Output {
        let mut cmd = self.ctr();
        cmd.args(["content", "fetch", "--all-platforms", "--hosts-dir"]).arg(hosts_dir).arg(reference);
        run(&mut cmd, Duration::from_secs(600))
    }

    /// [`Containerd::fetch`], panicking with ctr's and containerd's output unless it succeeds.
    pub fn fetch_ok(&self, hosts_dir: &Path, reference: &str) {
        let out = self.fetch(hosts_dir, reference);
        if !out.status.success() {
            let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            panic!("ctr content fetch {reference} failed ({})\nstdout:\n{o}\nstderr:\n{e}", out.status);
        }
    }

    /// Every digest in the content store (`ctr content ls -q`).
    pub fn content_digests(&self) -> BTreeSet<String> {
        let out = run_ok(self.ctr().args(["content", "ls", "-q"]), Duration::from_secs(30));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
    }

    /// containerd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("loading plugin")).collect();
            eprintln!("---- containerd log (last 30 lines) ----");
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
    }
}
