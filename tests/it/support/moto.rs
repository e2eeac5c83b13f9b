//! An S3 server for the bucket tests: moto in server mode (in memory; it does not check signatures), from
//! the venv scripts/test builds (`target/s3-venv`, override with `WHARF_S3_VENV`). Killed on drop.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::registry::{die_with_parent_thread, http};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server with one bucket.
pub struct Moto {
    child: Child,
    pub host: String,
    pub bucket: String,
}

impl Moto {
    /// Starts moto on a free 127.0.0.1 port and creates bucket `wharf`.
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Moto::start_on(port)
    }

    /// Starts moto on `port` (a restart: moto keeps nothing) and creates bucket `wharf`.
    pub fn start_on(port: u16) -> Moto {
        let venv = std::env::var_os("WHARF_S3_VENV")
            .map(std::path::PathBuf::from)
            .unwrap_or(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3-venv"));
        let bin = venv.join("bin/moto_server");
        assert!(bin.is_file(), "{} is missing: run scripts/test, which installs moto", bin.display());
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        die_with_parent_thread(&mut cmd);
        let child = cmd.spawn().expect("spawn moto_server");
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(&host, "GET", "/", &[], b"").is_err() {
            assert!(Instant::now() < deadline, "moto did not answer on {host}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let moto = Moto { child, host, bucket: "wharf".into() };
        let r = http(&moto.host, "PUT", "/wharf", &[], b"").expect("create bucket");
        assert_eq!(r.status, 200, "create bucket: {}", String::from_utf8_lossy(&r.body));
        moto
    }

    /// `wharf serve` flags and a config file (written to `dir`) pointing at this bucket.
    pub fn wharf_args(&self, dir: &std::path::Path) -> Vec<String> {
        self.wharf_args_with(dir, "")
    }

    /// [`Moto::wharf_args`] with more `[storage.s3]` keys.
    pub fn wharf_args_with(&self, dir: &std::path::Path, extra: &str) -> Vec<String> {
        let config = dir.join("s3.toml");
        let toml = format!(
            "[storage.s3]\nbucket = \"{}\"\nendpoint = \"http://{}\"\nallow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n{extra}",
            self.bucket, self.host
        );
        std::fs::write(&config, toml).unwrap();
        vec!["--config".into(), config.display().to_string()]
    }

    fn get(&self, uri: &str) -> String {
        let r = http(&self.host, "GET", uri, &[], b"").expect("moto request");
        assert_eq!(r.status, 200, "GET {uri}: {}", String::from_utf8_lossy(&r.body));
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Every object key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let xml = self.get(&format!("/{}?list-type=2", self.bucket));
        xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn unfinished_uploads(&self) -> usize {
        self.get(&format!("/{}?uploads", self.bucket)).matches("<Upload>").count()
    }

    /// Replaces object `key` with `bytes` (moto checks no signature).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let r = http(&self.host, "PUT", &format!("/{}/{key}", self.bucket), &[], bytes).expect("moto PUT");
        assert_eq!(r.status, 200, "PUT {key}: {}", String::from_utf8_lossy(&r.body));
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.host.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// The bytes of object `key`.
    pub fn object(&self, key: &str) -> Vec<u8> {
        http(&self.host, "GET", &format!("/{}/{key}", self.bucket), &[], b"").expect("moto GET").body
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
