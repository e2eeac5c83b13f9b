//! Process lifecycle: graceful shutdown on SIGTERM, JSON logs, layered configuration, secrets kept out of output.

use crate::support::fake_upstream::{FakeUpstream, client, spawn_fetch, wait_until};
use crate::support::wharf::Wharf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_download_finish_then_exits_cleanly() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(4 << 20);
    let gate = fake.gate(&digest, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let mut wharf = Wharf::start(dir.path(), &fake.wharf_args());
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let (download, _headers) = spawn_fetch(&client(), &url, &[]);
    gate.wait_reached().await;

    let pid = wharf.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until("wharf logs that it is shutting down", || wharf.log().contains("shutting down")).await;
    // No new connections once shutdown began.
    let refused = reqwest::get(format!("{}/v2/", wharf.url())).await;
    assert!(refused.is_err(), "a new request was accepted during shutdown: {refused:?}");

    gate.release();
    match download.await.unwrap() {
        crate::support::fake_upstream::Outcome::Complete(200, _, body) => assert!(body == data, "body differs"),
        other => panic!("in-flight download did not complete: {other:?}"),
    }
    let status = tokio::task::spawn_blocking(move || wharf.terminate()).await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "wharf exit status after SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_have_one_object_per_request() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = fake.wharf_args();
    args.push("--json".into());
    let wharf = Wharf::start(dir.path(), &args);
    let resp = reqwest::get(format!("{}/v2/test/app/manifests/missing?ns=fake.test", wharf.url())).await.unwrap();
    assert_eq!(resp.status(), 404);
    wait_until("a request line is logged", || wharf.log().contains("\"status\":404")).await;
    let line = wharf.log().lines().find(|l| l.contains("\"status\":404")).unwrap().to_owned();
    let v: serde_json::Value = serde_json::from_str(&line).expect("log line is JSON");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/v2/test/app/manifests/missing?ns=fake.test");
    assert_eq!(v["upstream"], "-");
}

fn wharf_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
}

#[test]
fn config_layers_file_env_and_flags_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wharf.toml");
    std::fs::write(
        &file,
        "tag_ttl = 5\nshutdown_grace = 7\n[registries.\"private.test\"]\nurl = \"https://private.test\"\nusername = \"bob\"\npassword = \"hunter2-secret\"\n",
    )
    .unwrap();
    let out = wharf_cmd()
        .args(["config", "--config"])
        .arg(&file)
        .args(["--tag-ttl", "9"])
        .env("WHARF_SHUTDOWN_GRACE", "11")
        .env("WHARF_UPSTREAM__READ_TIMEOUT", "123")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(parsed["tag_ttl"].as_integer(), Some(9), "flag beats file");
    assert_eq!(parsed["shutdown_grace"].as_integer(), Some(11), "env beats file");
    assert_eq!(parsed["upstream"]["read_timeout"].as_integer(), Some(123), "nested env key");
    assert_eq!(parsed["registries"]["private.test"]["username"].as_str(), Some("bob"));
    assert!(parsed["registries"]["docker.io"].is_table(), "built-in registries stay");
    assert!(!text.contains("hunter2-secret"), "secret printed:\n{text}");
}

#[test]
fn bad_config_names_the_key_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wharf.toml");
    std::fs::write(&file, "[registries.\"x\"]\nurl = \"http://x\"\npassword = \"hunter2-secret\"\n").unwrap();
    let out = wharf_cmd().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registries.\"x\".url") && err.contains("insecure"), "{err}");
    assert!(!err.contains("hunter2-secret"), "{err}");

    std::fs::write(&file, "tag_tll = 5\n").unwrap();
    let out = wharf_cmd().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tag_tll"), "unknown keys are named");
}

#[test]
fn help_lists_the_stable_flags() {
    let out = wharf_cmd().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--listen", "--data-dir", "--upstream", "--default-registry", "--tag-ttl", "--credentials", "--config"]
    {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_wharf_on_a_live_data_directory_is_refused_and_wipes_nothing() {
    use std::os::unix::fs::MetadataExt;
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(1000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &fake.wharf_args());
    crate::support::fake_upstream::get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data)
        .await;
    let db = dir.path().join("meta").join("db");
    let inode = std::fs::metadata(&db).unwrap().ino();

    let mut second = wharf_cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(fake.wharf_args())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A second wharf that wrongly starts serving never exits: bound the wait, then fail.
    let mut status = None;
    crate::support::fake_upstream::wait_until("the second wharf exits", || {
        status = second.try_wait().unwrap();
        status.is_some()
    })
    .await;
    assert!(!status.unwrap().success(), "a second wharf started on a live data directory");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("in use by another wharf"), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().ino(), inode, "the live metadata database was replaced");
    assert_eq!(fake.blob_gets(&digest), 1);
    crate::support::fake_upstream::get_ok(&client(), &format!("{}/v2/test/app/blobs/{digest}", wharf.url()), &data)
        .await;
    assert_eq!(fake.blob_gets(&digest), 1, "the first wharf lost its cache");
}
