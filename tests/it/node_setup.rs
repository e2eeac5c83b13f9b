//! `wharf node-setup` as a process on temporary host trees: a real containerd 1.6 pulls through wharf with the
//! generated certs.d and falls back to the upstream once wharf stops; the run is idempotent, merges and backs up
//! an operator's hosts.toml, `--remove` restores the tree byte for byte, and a missing `config_path` is reported.

use crate::support::containerd::Containerd;
use crate::support::images::{TestImage, run};
use crate::support::registry::shared;
use crate::support::wharf::Wharf;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const CERTS: &str = "/etc/containerd/certs.d";
const CONFIG: &str = "/etc/containerd/config.toml";

/// containerd 1.x config with the CRI `config_path` set, as node-setup wants it.
const CONFIG_WITH_PATH: &str =
    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";

/// An operator's own hosts.toml (odd formatting, a comment, a mode of its own) that must survive byte for byte.
const OPERATOR_FILE: &str = "# ours: corporate mirror first\nserver   = \"https://registry-1.docker.io\"\n\n\
                             [host.\"https://mirror.corp.example\"]\n    capabilities = [ \"pull\" ]\n";

/// `wharf node-setup --root ROOT ARGS…`, with `WHARF_…` variables removed so the host cannot interfere.
fn node_setup(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
    cmd.arg("node-setup").arg("--root").arg(root).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WHARF_") {
            cmd.env_remove(key);
        }
    }
    run(&mut cmd, Duration::from_secs(60))
}

fn node_setup_ok(root: &Path, args: &[&str]) -> (String, String) {
    let out = node_setup(root, args);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "node-setup {args:?} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    (stdout, stderr)
}

/// Every entry under `dir`: relative path → (mode, bytes, mtime in ns; directories have no bytes).
type Snapshot = BTreeMap<PathBuf, (u32, Option<Vec<u8>>, i128)>;

fn snapshot(dir: &Path) -> Snapshot {
    fn walk(base: &Path, dir: &Path, out: &mut Snapshot) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
            let rel = path.strip_prefix(base).unwrap().to_path_buf();
            if meta.is_dir() {
                out.insert(rel, (meta.mode(), None, 0));
                walk(base, &path, out);
            } else {
                out.insert(rel, (meta.mode(), Some(std::fs::read(&path).unwrap()), mtime));
            }
        }
    }
    let mut out = Snapshot::new();
    walk(dir, dir, &mut out);
    out
}

fn without_mtimes(s: &Snapshot) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
    s.iter().map(|(p, (m, b, _))| (p.clone(), (*m, b.clone()))).collect()
}

/// A host tree: containerd's config, an operator's docker.io/hosts.toml (mode 0600) next to a CA file, and an
/// empty quay.io directory.
fn host_tree(containerd_config: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("etc/containerd/certs.d");
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::create_dir_all(certs.join("quay.io")).unwrap();
    std::fs::write(root.path().join("etc/containerd/config.toml"), containerd_config).unwrap();
    let hosts = certs.join("docker.io/hosts.toml");
    std::fs::write(&hosts, OPERATOR_FILE).unwrap();
    std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(certs.join("docker.io/ca.crt"), "not really a certificate\n").unwrap();
    root
}

/// Host keys of a hosts.toml in file order (the order containerd tries them).
fn hosts_in_order(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("[host.\""))
        .map(|l| l.split('"').next().unwrap().into())
        .collect()
}

#[test]
fn node_setup_is_idempotent_merges_and_remove_restores_byte_for_byte() {
    let root = host_tree(CONFIG_WITH_PATH);
    let certs = root.path().join("etc/containerd/certs.d");
    let before = snapshot(root.path());
    let args = ["--mirror", "http://127.0.0.1:5000", "--upstream", "extra.test:5000=http://127.0.0.1:1"];
    let (stdout, stderr) = node_setup_ok(root.path(), &args);
    assert!(!stderr.contains("warning"), "config_path is set, yet: {stderr}");
    for registry in
        ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io", "gcr.io", "mcr.microsoft.com", "public.ecr.aws"]
    {
        let text = std::fs::read_to_string(certs.join(registry).join("hosts.toml"))
            .unwrap_or_else(|e| panic!("{registry}: {e}\n{stdout}"));
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(hosts_in_order(&text)[0], "http://127.0.0.1:5000", "{registry}: wharf is not first:\n{text}");
        let wharf = &parsed["host"]["http://127.0.0.1:5000"];
        assert_eq!(wharf["capabilities"].as_array().unwrap().len(), 2, "{text}");
        assert_eq!(wharf["dial_timeout"].as_str(), Some("1s"));
        let server = parsed["server"].as_str().unwrap();
        let want =
            if registry == "docker.io" { "https://registry-1.docker.io".into() } else { format!("https://{registry}") };
        assert_eq!(server, want, "{registry}");
    }
    let extra = std::fs::read_to_string(certs.join("extra.test:5000/hosts.toml")).unwrap();
    assert!(extra.contains("server = \"http://127.0.0.1:1\""), "{extra}");

    // The operator's file: backed up untouched, merged after wharf.
    let docker = certs.join("docker.io");
    assert_eq!(std::fs::read_to_string(docker.join("hosts.toml.wharf-orig")).unwrap(), OPERATOR_FILE);
    assert_eq!(std::fs::metadata(docker.join("hosts.toml.wharf-orig")).unwrap().mode() & 0o777, 0o600);
    let merged = std::fs::read_to_string(docker.join("hosts.toml")).unwrap();
    assert_eq!(hosts_in_order(&merged), ["http://127.0.0.1:5000", "https://mirror.corp.example"], "{merged}");
    assert!(stdout.contains("docker.io: kept the previous hosts.toml"), "{stdout}");

    // Running again changes nothing: same bytes, same mtimes, same backup.
    let after_first = snapshot(root.path());
    let (stdout, _) = node_setup_ok(root.path(), &args);
    assert_eq!(snapshot(root.path()), after_first, "second run changed files:\n{stdout}");
    assert!(stdout.lines().all(|l| l.ends_with("hosts.toml up to date")), "{stdout}");

    // A registry dropped from the configuration is undone on the next run.
    let (stdout, _) = node_setup_ok(root.path(), &["--mirror", "http://127.0.0.1:5000"]);
    assert!(stdout.contains("extra.test:5000: removed hosts.toml"), "{stdout}");
    assert!(!certs.join("extra.test:5000").exists(), "the directory node-setup created is gone");

    // A new mirror address rewrites the generated files but keeps the original backup.
    node_setup_ok(root.path(), &["--mirror", "http://127.0.0.1:5999"]);
    let moved = std::fs::read_to_string(docker.join("hosts.toml")).unwrap();
    assert_eq!(hosts_in_order(&moved), ["http://127.0.0.1:5999", "https://mirror.corp.example"], "{moved}");
    assert_eq!(std::fs::read_to_string(docker.join("hosts.toml.wharf-orig")).unwrap(), OPERATOR_FILE);

    // --remove: the tree is as it was, byte for byte and mode for mode; the untouched files keep their mtimes.
    let (stdout, _) = node_setup_ok(root.path(), &["--remove"]);
    assert!(stdout.contains("docker.io: restored the previous hosts.toml"), "{stdout}");
    let restored = snapshot(root.path());
    assert_eq!(without_mtimes(&restored), without_mtimes(&before), "--remove did not restore the tree");
    let hosts = PathBuf::from("etc/containerd/certs.d/docker.io/hosts.toml");
    assert_eq!(restored[&hosts].2, before[&hosts].2, "the operator's file was rewritten, not renamed back");
    // And --remove again has nothing left to do.
    let (stdout, _) = node_setup_ok(root.path(), &["--remove"]);
    assert_eq!(stdout, "", "second --remove acted");
    assert_eq!(snapshot(root.path()), restored);
}

#[test]
fn node_setup_repairs_an_interrupted_run_and_keeps_a_later_operator_edit() {
    let root = host_tree(CONFIG_WITH_PATH);
    let docker = root.path().join("etc/containerd/certs.d/docker.io");
    node_setup_ok(root.path(), &[]);
    let generated = std::fs::read(docker.join("hosts.toml")).unwrap();
    // A crash after the backup was made but before the new file was renamed in: no hosts.toml, a temp file.
    std::fs::remove_file(docker.join("hosts.toml")).unwrap();
    std::fs::write(docker.join(".hosts.toml.wharf-tmp"), "half").unwrap();
    node_setup_ok(root.path(), &[]);
    assert_eq!(std::fs::read(docker.join("hosts.toml")).unwrap(), generated);
    assert!(!docker.join(".hosts.toml.wharf-tmp").exists());
    assert_eq!(std::fs::read_to_string(docker.join("hosts.toml.wharf-orig")).unwrap(), OPERATOR_FILE);

    // The operator replaces the generated file: it becomes the new previous file.
    let edit = "server = \"https://registry-1.docker.io\"\n[host.\"https://other.corp.example\"]\n";
    std::fs::write(docker.join("hosts.toml"), edit).unwrap();
    node_setup_ok(root.path(), &[]);
    assert_eq!(std::fs::read_to_string(docker.join("hosts.toml.wharf-orig")).unwrap(), edit);
    node_setup_ok(root.path(), &["--remove"]);
    assert_eq!(std::fs::read_to_string(docker.join("hosts.toml")).unwrap(), edit);
    assert!(!docker.join("hosts.toml.wharf-orig").exists());
}

#[test]
fn node_setup_leaves_an_unparsable_hosts_toml_alone() {
    let root = host_tree(CONFIG_WITH_PATH);
    let ghcr = root.path().join("etc/containerd/certs.d/ghcr.io");
    std::fs::create_dir_all(&ghcr).unwrap();
    std::fs::write(ghcr.join("hosts.toml"), "server = [\n").unwrap();
    let (stdout, stderr) = node_setup_ok(root.path(), &[]);
    assert!(stdout.contains("ghcr.io: left alone"), "{stdout}");
    assert!(stderr.contains("ghcr.io/hosts.toml: not valid TOML"), "{stderr}");
    assert_eq!(std::fs::read_to_string(ghcr.join("hosts.toml")).unwrap(), "server = [\n");
    assert!(!ghcr.join("hosts.toml.wharf-orig").exists());
}

#[test]
fn node_setup_warns_when_containerd_does_not_read_certs_d() {
    let cases = [
        ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n", true),
        ("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n", true),
        ("version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/elsewhere\"\n", true),
        ("version = 3\n", false), // containerd 2.x reads /etc/containerd/certs.d by default
        (CONFIG_WITH_PATH, false),
    ];
    for (config, warns) in cases {
        let root = host_tree(config);
        let before = std::fs::read(root.path().join("etc/containerd/config.toml")).unwrap();
        let (_, stderr) = node_setup_ok(root.path(), &["--containerd-config", CONFIG, "--certs-dir", CERTS]);
        assert_eq!(stderr.contains("warning:") && stderr.contains("config_path"), warns, "{config}\n{stderr}");
        if warns {
            assert!(stderr.contains("restart containerd once"), "{stderr}");
        }
        assert_eq!(std::fs::read(root.path().join("etc/containerd/config.toml")).unwrap(), before);
    }
}

#[test]
fn node_setup_prepares_the_cache_directory() {
    let root = host_tree(CONFIG_WITH_PATH);
    let data = root.path().join("var/lib/wharf");
    let config = root.path().join("wharf.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", data.to_str().unwrap())).unwrap();
    let me = std::fs::metadata(root.path()).unwrap();
    let owner = format!("{}:{}", me.uid(), me.gid());
    node_setup_ok(root.path(), &["--config", config.to_str().unwrap(), "--data-owner", &owner]);
    let meta = std::fs::metadata(&data).unwrap();
    assert!(meta.is_dir());
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (me.uid(), me.gid(), 0o750));
    let bad = node_setup(root.path(), &["--data-owner", "nonroot"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("UID:GID"));

    // --only-data-dir touches nothing of containerd's.
    let bare = tempfile::tempdir().unwrap();
    let data = bare.path().join("cache");
    let config = bare.path().join("wharf.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", data.to_str().unwrap())).unwrap();
    let (stdout, stderr) =
        node_setup_ok(bare.path(), &["--config", config.to_str().unwrap(), "--data-owner", &owner, "--only-data-dir"]);
    assert_eq!((stdout.as_str(), stderr.as_str()), ("", ""));
    let entries: Vec<_> = std::fs::read_dir(bare.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 2, "only wharf.toml and the cache directory: {entries:?}");
}

/// A cache written by another user (say, root before an upgrade) is handed to wharf's user as a whole. Needs
/// root (CI runs as root); as any other user the test checks that node-setup refuses rather than half-does it.
#[test]
fn node_setup_hands_an_existing_cache_to_wharfs_user() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(data.join("blobs/sha256/ab")).unwrap();
    std::fs::write(data.join("blobs/sha256/ab/abcd"), "blob").unwrap();
    std::fs::set_permissions(data.join("blobs"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = root.path().join("wharf.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", data.to_str().unwrap())).unwrap();
    let args = ["--config", config.to_str().unwrap(), "--data-owner", "65532:65532", "--only-data-dir"];
    let out = node_setup(root.path(), &args);
    if unsafe { libc::geteuid() } != 0 {
        assert!(!out.status.success(), "chown to another user succeeded without root");
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for path in ["", "blobs", "blobs/sha256", "blobs/sha256/ab", "blobs/sha256/ab/abcd"] {
        let meta = std::fs::metadata(data.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65532, 65532), "{path}");
    }
}

fn assert_in_store(ctd: &Containerd, image: &TestImage) {
    let store = ctd.content_digests();
    let missing: Vec<_> = image.all_digests().into_iter().filter(|d| !store.contains(d)).collect();
    assert!(missing.is_empty(), "{}: not in containerd's content store: {missing:?}", image.reference());
}

/// The acceptance test: node-setup's certs.d makes containerd pull through wharf while it runs, and
/// straight from the upstream (`server`) once it is stopped; `--remove` restores the previous files.
#[test]
fn containerd_pulls_through_wharf_and_falls_back_when_wharf_stops() {
    let seeded = shared();
    let registry = &seeded.registry;
    let image = seeded.alias("test/multi"); // own repository: the counts below are this test's traffic only
    let reference = format!("registry.test/{}", image.reference());
    let tmp = tempfile::tempdir().unwrap();
    let mut wharf =
        Wharf::start(&tmp.path().join("data"), &["--upstream".into(), format!("registry.test={}", registry.url())]);
    let root = host_tree(CONFIG_WITH_PATH);
    let before = snapshot(root.path());
    let upstream = format!("registry.test={}", registry.url());
    let (stdout, stderr) = node_setup_ok(
        root.path(),
        &["--upstream", &upstream, "--mirror", &wharf.url(), "--containerd-config", CONFIG, "--certs-dir", CERTS],
    );
    assert!(stdout.contains("registry.test: wrote hosts.toml") && !stderr.contains("warning"), "{stdout}{stderr}");
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    let generated = std::fs::read_to_string(hosts_dir.join("registry.test/hosts.toml")).unwrap();
    assert!(generated.contains(&format!("server = \"{}\"", registry.url())), "{generated}");

    // 1. wharf runs: containerd resolves and fetches through it (wharf logs containerd's `ns` requests).
    let ctd = Containerd::start();
    ctd.fetch_ok(&hosts_dir, &reference);
    assert_in_store(&ctd, &image);
    let log = wharf.log();
    for wanted in [format!("/v2/{}/manifests/", image.repo), format!("/v2/{}/blobs/", image.repo)] {
        assert!(
            log.lines().any(|l| l.contains(&wanted) && l.contains("ns=registry.test")),
            "wharf logged no {wanted}…?ns=registry.test:\n{log}"
        );
    }
    drop(ctd);

    // 2. wharf stops: a fresh containerd (empty content store) falls back to `server` and still succeeds.
    let blobs = format!("/v2/{}/blobs/", image.repo);
    let upstream_gets = registry.count("GET", &blobs);
    let status = wharf.terminate().expect("wharf was running");
    assert!(status.success(), "wharf exit status after SIGTERM: {status}");
    let ctd = Containerd::start();
    ctd.fetch_ok(&hosts_dir, &reference);
    assert_in_store(&ctd, &image);
    let direct = registry.count("GET", &blobs) - upstream_gets;
    assert!(direct >= image.blobs.len(), "with wharf down, containerd fetched {direct} blobs from the upstream");
    drop(ctd);

    // 3. --remove restores the previous files byte for byte.
    node_setup_ok(root.path(), &["--remove", "--certs-dir", CERTS]);
    assert_eq!(without_mtimes(&snapshot(root.path())), without_mtimes(&before));
}
