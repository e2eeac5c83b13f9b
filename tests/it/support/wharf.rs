//! Spawns the real `wharf` binary on an ephemeral loopback port and kills it on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running wharf process. Its log is kept in memory and printed if the test panics.
pub struct Wharf {
    child: Option<Child>,
    /// The address wharf reported in its start-up line.
    pub addr: SocketAddr,
    /// The data directory (owned by the caller, so a restart can reuse it).
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Wharf {
    /// Starts wharf with `--listen 127.0.0.1:0 --data-dir DIR` plus `args` (and no `WHARF_*` variables), and
    /// waits for its start-up line.
    pub fn start(data_dir: &Path, args: &[String]) -> Wharf {
        Wharf::start_at("127.0.0.1:0", data_dir, args)
    }

    /// [`Wharf::start`] with the client API on `listen` (e.g. `127.0.0.3:0` for one node of a cluster).
    pub fn start_at(listen: &str, data_dir: &Path, args: &[String]) -> Wharf {
        Wharf::start_configured(listen, data_dir, args, |_| {})
    }

    /// [`Wharf::start_at`], with `configure` applied to the command before it is spawned.
    pub fn start_configured(
        listen: &str,
        data_dir: &Path,
        args: &[String],
        configure: impl FnOnce(&mut Command),
    ) -> Wharf {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
        configure(&mut cmd);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WHARF_") {
                // wharf reads WHARF_* as configuration (and rejects unknown keys such as the tests' own
                // WHARF_CHAOS_SEED): the caller's environment must not change what a test starts.
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info,wharf=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wharf");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                {
                    // Logged before the address is announced, so the caller sees the line in `log()`.
                    let mut l = log2.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                // The peer API's line comes first and is not the client API's address.
                if line.contains("peer API") {
                    continue;
                }
                if let Some(rest) =
                    line.split("listening on http://").nth(1).or(line.split("listening on https://").nth(1))
                {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace() && *c != '"').collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("parse listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("wharf did not start:\n{}", log.lock().unwrap());
            }
        };
        Wharf { child: Some(child), addr, data_dir: data_dir.to_path_buf(), log }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A sample from `/metrics` (`name` exactly as exposed, without labels); 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let resp = super::fake_upstream::client().get(format!("{}/metrics", self.url())).send().await;
        let text = resp.expect("GET /metrics").text().await.expect("read /metrics");
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
        line.and_then(|l| l.split_whitespace().nth(1)).map_or(0.0, |v| v.parse().expect("a number"))
    }

    /// Everything wharf logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the process is still running (false once it exited on its own, or was killed).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` (SIGSTOP, SIGCONT…) to the process.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: a plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit status (with a deadline).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Wharf {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- wharf log ----\n{}", self.log());
        }
    }
}
