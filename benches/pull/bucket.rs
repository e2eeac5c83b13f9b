//! The S3 server of scenario 9 (issue 13's bucket tier): s3s-fs, a Rust S3 server keeping each object as a
//! file under a root directory and checking SigV4 signatures, so a ranged GET is a file read as on real S3
//! (moto copied the whole object for every range). Installed by scripts/test into `target/s3s-fs`
//! (`WHARF_S3S_FS` names another binary); runs on 127.0.0.1 with one bucket whose root is in the run
//! directory. Only the documented interface is used: the `[storage.s3]` config section handed to wharf and
//! the object layout `<prefix>/blobs/sha256/<hex>`, read back from s3s-fs's files (listing the bucket would
//! need a signed request).

use crate::procs::{self, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bucket every scenario-9 wharf shares.
const BUCKET: &str = "bench";
/// The credentials s3s-fs accepts and wharf signs with.
const ACCESS_KEY: &str = "wharf-bench";
const SECRET_KEY: &str = "wharf-bench-secret";

/// The s3s-fs binary: `WHARF_S3S_FS` (as for the tests) or `target/s3s-fs/bin/s3s-fs`.
pub fn binary() -> PathBuf {
    std::env::var_os("WHARF_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3s-fs/bin/s3s-fs"))
}

/// None if s3s-fs can be started from [`binary`], else why not and how to fix it.
pub fn missing() -> Option<String> {
    let bin = binary();
    (!bin.is_file()).then(|| {
        format!(
            "s3s-fs is not installed at {} (WHARF_S3S_FS names another binary); scripts/test installs it, or by \
             hand: `cargo install --locked s3s-fs@0.14.1 --features binary --root target/s3s-fs`",
            bin.display()
        )
    })
}

/// A running s3s-fs with the bench's bucket (killed on drop).
pub struct S3sFs {
    /// The server process (its CPU goes into the run notes).
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The directory holding the buckets (`root/bench/<key>`).
    root: PathBuf,
    /// s3s-fs's version, for the report.
    pub version: String,
}

impl S3sFs {
    /// Creates the bucket's directory under `root`, starts s3s-fs on a free port and waits until it answers.
    pub async fn start(root: &Path) -> Result<S3sFs, String> {
        let bin = binary();
        std::fs::create_dir_all(root.join(BUCKET)).map_err(|e| format!("create {}: {e}", root.display()))?;
        let port = procs::free_port();
        let mut cmd = Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
            .args(["--secret-key", SECRET_KEY])
            .arg(root);
        let proc = Proc::spawn("s3s-fs", cmd, None);
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        // Any answer (an unsigned request gets 403) means it listens.
        while http.get(format!("{endpoint}/")).send().await.is_err() {
            if Instant::now() > deadline {
                return Err(format!("s3s-fs did not answer on {endpoint}:\n{}", proc.log_tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut v = Command::new(&bin);
        v.arg("--version");
        let (_, out, _) = procs::run_output(v, Duration::from_secs(30));
        let version = out.trim().trim_start_matches("s3s-fs").trim().to_string();
        Ok(S3sFs { proc, endpoint, root: root.to_path_buf(), version })
    }

    /// The `[storage.s3]` section of a wharf config file pointing at this bucket.
    pub fn config_toml(&self) -> String {
        format!(
            "[storage.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint
        )
    }

    /// A `curl` that GETs the object of `digest` (`sha256:<hex>`) to /dev/null, signed with SigV4 as wharf
    /// signs (scenario 11's floor for receiving the bytes from the bucket).
    pub fn curl_get(&self, digest: &str) -> Command {
        let hex = digest.trim_start_matches("sha256:");
        let mut cmd = Command::new("curl");
        // curl signs without the payload hash header, which S3 (and s3s) require.
        cmd.args(["-sf", "-o", "/dev/null", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{ACCESS_KEY}:{SECRET_KEY}"))
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(format!("{}/{BUCKET}/blobs/sha256/{hex}", self.endpoint));
        cmd
    }

    /// True if the bucket holds the object of `digest` (`sha256:<hex>`, no prefix) with `size` bytes: a
    /// partial or missing file is not there yet.
    pub fn has_blob(&self, digest: &str, size: u64) -> bool {
        let hex = digest.trim_start_matches("sha256:");
        let path = self.root.join(BUCKET).join("blobs/sha256").join(hex);
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
    }
}
