//! The S3 server of scenario 9 (issue 13's bucket tier): moto in server mode (in memory, no signature
//! checks) from the venv scripts/test creates (`target/s3-venv`, or `WHARF_S3_VENV`), on 127.0.0.1, with one
//! bucket. Only the documented interface is used: the `[storage.s3]` config section handed to wharf and the
//! object layout `<prefix>/blobs/sha256/<hex>` read back by listing the bucket.

use crate::procs::{self, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The bucket every scenario-9 wharf shares.
const BUCKET: &str = "bench";

/// The venv holding moto: `WHARF_S3_VENV` (as for the tests) or `target/s3-venv`.
pub fn venv() -> PathBuf {
    std::env::var_os("WHARF_S3_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/s3-venv"))
}

/// None if moto can be started from [`venv`], else why not and how to fix it.
pub fn missing() -> Option<String> {
    let venv = venv();
    // The interpreter, not the `moto_server` script, is what runs: a copied venv keeps a script shebang
    // pointing at the original, but its `python3` finds the copy's site-packages.
    let ok = venv.join("bin/python3").exists() && venv.join("bin/moto_server").exists();
    (!ok).then(|| {
        format!(
            "moto is not installed in {} (WHARF_S3_VENV names another venv); scripts/test creates it, or by hand: \
             `python3 -m venv target/s3-venv && target/s3-venv/bin/pip install -r tests/s3/requirements.txt`",
            venv.display()
        )
    })
}

/// A running moto server with the bench's bucket (killed on drop).
pub struct Moto {
    /// The server process (its CPU goes into the run notes).
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// moto's version, for the report.
    pub version: String,
}

impl Moto {
    /// Starts moto on a free port, waits until it answers and creates the bucket.
    pub async fn start() -> Result<Moto, String> {
        let python = venv().join("bin/python3");
        let port = procs::free_port();
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]);
        let proc = Proc::spawn("moto", cmd, None);
        let endpoint = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http.get(format!("{endpoint}/")).send().await, Ok(r) if r.status().is_success()) {
            if Instant::now() > deadline {
                return Err(format!("moto did not answer on {endpoint}:\n{}", proc.log_tail(20)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = http.put(format!("{endpoint}/{BUCKET}")).send().await.map_err(|e| format!("create bucket: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("create bucket: {} {}", r.status(), r.text().await.unwrap_or_default()));
        }
        let mut v = Command::new(&python);
        v.args(["-c", "import moto; print(moto.__version__)"]);
        let (_, out, _) = procs::run_output(v, Duration::from_secs(30));
        Ok(Moto { proc, endpoint, version: out.trim().to_string() })
    }

    /// The `[storage.s3]` section of a wharf config file pointing at this bucket.
    pub fn config_toml(&self) -> String {
        format!(
            "[storage.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            self.endpoint
        )
    }

    /// Every object key in the bucket (one listing page: the bench stores far fewer than 1000 objects).
    pub async fn keys(&self) -> Result<Vec<String>, String> {
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        let r = http
            .get(format!("{}/{BUCKET}?list-type=2", self.endpoint))
            .send()
            .await
            .map_err(|e| format!("list bucket: {e}"))?;
        let xml = r.text().await.map_err(|e| format!("list bucket: {e}"))?;
        Ok(xml.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect())
    }
}

/// True if `keys` holds the object of `digest` (`sha256:<hex>`): `<prefix>/blobs/sha256/<hex>`.
pub fn has_blob(keys: &[String], digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    let suffix = format!("blobs/sha256/{hex}");
    keys.iter().any(|k| k.ends_with(&suffix))
}
