//! An S3 server for the bucket tests: moto in server mode (in memory; it does not check signatures), from
//! the venv scripts/test builds (`target/s3-venv`, override with `WHARF_S3_VENV`). Killed on drop.

#![allow(dead_code)] // harness: not every helper is used by every test

use super::registry::{http, spawn_tied};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An `Authorization` header: moto checks no signature, but treats requests without one as anonymous, and
/// an anonymous request may not read or replace an object that an authorized `PutObject` created.
const AUTH: &[(&str, &str)] = &[(
    "authorization",
    "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0",
)];

/// A running moto server with one bucket.
pub struct Moto {
    child: Child,
    /// moto's request log (one line per request, with the status).
    log: tempfile::NamedTempFile,
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
        let log = tempfile::NamedTempFile::new().expect("moto log file");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("moto log file"));
        let child = spawn_tied(cmd).expect("spawn moto_server");
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(&host, "GET", "/", &[], b"").is_err() {
            assert!(Instant::now() < deadline, "moto did not answer on {host}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let moto = Moto { child, log, host, bucket: "wharf".into() };
        let r = http(&moto.host, "PUT", "/wharf", AUTH, b"").expect("create bucket");
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
        let r = http(&self.host, "GET", uri, AUTH, b"").expect("moto request");
        assert_eq!(r.status, 200, "GET {uri}: {}", String::from_utf8_lossy(&r.body));
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Every object key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let xml = self.get(&format!("/{}?list-type=2", self.bucket));
        xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect()
    }

    /// The status of every `GET` of object `key` by wharf so far (206 for a range), from moto's request
    /// log (the tests' own requests are HTTP/1.0).
    pub fn gets(&self, key: &str) -> Vec<u16> {
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let want = format!("GET /{}/{key} HTTP/1.1", self.bucket);
        log.lines()
            .filter(|l| l.contains(&want))
            .filter_map(|l| l.rsplit_once("\" ")?.1.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Parts uploaded so far by the multipart uploads still open (started and neither completed nor aborted).
    pub fn parts_in_progress(&self) -> usize {
        let xml = self.get(&format!("/{}?uploads", self.bucket));
        let field = |s: &str, tag: &str| -> String {
            let open = format!("<{tag}>");
            s.split(&open).nth(1).and_then(|r| r.split(&format!("</{tag}>")).next()).unwrap_or_default().to_owned()
        };
        xml.split("<Upload>")
            .skip(1)
            .map(|u| {
                let (key, id) = (field(u, "Key"), field(u, "UploadId"));
                // moto breaks the connection when asked for the parts of an upload that has none yet.
                http(&self.host, "GET", &format!("/{}/{key}?uploadId={id}", self.bucket), AUTH, b"")
                    .map_or(0, |r| String::from_utf8_lossy(&r.body).matches("<Part>").count())
            })
            .sum()
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn unfinished_uploads(&self) -> usize {
        self.get(&format!("/{}?uploads", self.bucket)).matches("<Upload>").count()
    }

    /// Replaces object `key` with `bytes` (moto checks no signature).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let r = http(&self.host, "PUT", &format!("/{}/{key}", self.bucket), AUTH, bytes).expect("moto PUT");
        assert_eq!(r.status, 200, "PUT {key}: {}", String::from_utf8_lossy(&r.body));
    }

    /// The `Content-Type` moto keeps for object `key`.
    pub fn content_type(&self, key: &str) -> Option<String> {
        let r = http(&self.host, "HEAD", &format!("/{}/{key}", self.bucket), AUTH, b"").expect("moto HEAD");
        r.header("content-type").map(str::to_owned)
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.host.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// The bytes of object `key`.
    pub fn object(&self, key: &str) -> Vec<u8> {
        let r = http(&self.host, "GET", &format!("/{}/{key}", self.bucket), AUTH, b"").expect("moto GET");
        assert_eq!(r.status, 200, "GET {key}: {}", String::from_utf8_lossy(&r.body));
        r.body
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
