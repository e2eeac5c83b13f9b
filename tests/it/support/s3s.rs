//! A second S3 server for the bucket tests: s3s-fs, which keeps objects as files under a root directory (so
//! they outlive a restart) and checks SigV4 signatures (so wrong credentials are refused). Installed by
//! scripts/test into `target/s3s-fs` (override with `WHARF_S3S_FS`, the binary). Killed on drop.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::registry::{http, spawn_tied};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key every s3s-fs in the tests accepts.
pub const ACCESS_KEY: &str = "wharf-test";

/// A running s3s-fs with bucket `wharf` under `root`.
pub struct S3sFs {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// The directory holding the buckets (`root/wharf/<key>`).
    pub root: PathBuf,
    /// The secret key it accepts.
    pub secret: String,
}

impl S3sFs {
    /// Starts s3s-fs on `port` (0: a free one) over `root` (created with the bucket if missing), accepting
    /// [`ACCESS_KEY`] with `secret`.
    pub fn start(root: &Path, port: u16, secret: &str) -> S3sFs {
        let bin = std::env::var_os("WHARF_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3s-fs/bin/s3s-fs"));
        assert!(bin.is_file(), "{} is missing: run scripts/test, which installs s3s-fs", bin.display());
        std::fs::create_dir_all(root.join("wharf")).unwrap();
        let port = match port {
            0 => std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
            p => p,
        };
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
            .args(["--secret-key", secret])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied(cmd).expect("spawn s3s-fs");
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Any answer (an unsigned request gets 403) means it listens.
        while http(&host, "GET", "/", &[], b"").is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not answer on {host}");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3sFs { child, host, root: root.to_owned(), secret: secret.to_owned() }
    }

    /// [`S3sFs::start`] from async code (it waits on the blocking pool).
    pub async fn launch(root: &Path, port: u16, secret: &str) -> S3sFs {
        let (root, secret) = (root.to_owned(), secret.to_owned());
        tokio::task::spawn_blocking(move || S3sFs::start(&root, port, &secret)).await.unwrap()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.host.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// `wharf serve` flags and a config file (written to `dir`) pointing at this server with `secret`.
    pub fn wharf_args(&self, dir: &Path, secret: &str, extra: &str) -> Vec<String> {
        let config = dir.join("s3s.toml");
        let toml = format!(
            "[storage.s3]\nbucket = \"wharf\"\nendpoint = \"http://{}\"\nallow_http = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{secret}\"\n{extra}",
            self.host
        );
        std::fs::write(&config, toml).unwrap();
        vec!["--config".into(), config.display().to_string()]
    }

    /// The object `key` as s3s-fs keeps it on disk, if it exists.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.join("wharf").join(key)).ok()
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
