//! `wharf node-setup`: points the node's containerd at wharf, safely and reversibly.
//!
//! For every registry wharf mirrors (the built-in seven plus configured ones) it writes
//! `<certs.d>/<registry>/hosts.toml` so that containerd tries wharf on this node first (pull and resolve) and
//! falls back to the registry's `server` when wharf is unreachable or answers an error. containerd reads these
//! files on every pull once its CRI plugin has `config_path` set, so nothing is restarted; the containerd config
//! is only read, to warn when `config_path` is missing.
//!
//! Safety rules, in the order they are applied:
//! - A `hosts.toml` wharf did not write is renamed to `hosts.toml.wharf-orig` (byte for byte, mode kept) and
//!   merged: wharf's host goes first, the file's own hosts, `server` and root keys follow unchanged, so the
//!   previous fallback order is kept after wharf.
//! - Files are replaced with write-temporary-then-rename; containerd never reads a half-written file, and a
//!   crash at any point is repaired by running again.
//! - The generated file names its own state in a header (`previous=…`, `created-dir=…`), so running again
//!   regenerates it from the backup (idempotent: nothing is written when nothing changed) and `--remove` knows
//!   what to restore: the backup is renamed back, or the file (and the directory, if node-setup created it) is
//!   removed. Registries dropped from the configuration are restored the same way.
//! - A `hosts.toml` that does not parse as TOML is left alone with a warning.

use crate::config::{Config, Overrides, parse_upstream_flag};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// First line of every file node-setup writes; how it recognises its own files.
pub const MARKER: &str = "# Managed by wharf node-setup";
/// Name of the backup of a `hosts.toml` that node-setup replaced.
pub const BACKUP: &str = "hosts.toml.wharf-orig";
const HOSTS: &str = "hosts.toml";
const TEMP: &str = ".hosts.toml.wharf-tmp";
const STATE_KEY: &str = "# wharf-node-setup:";

/// Flags of `wharf node-setup`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// wharf's TOML config (the file `serve` reads): each of its registries gets a hosts.toml.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also mirror REGISTRY, as `serve --upstream`; URL becomes containerd's fallback `server`.
    #[arg(long = "upstream", value_name = "REGISTRY=URL", value_parser = parse_upstream_flag)]
    pub upstreams: Vec<(String, String)>,
    /// wharf as this node's containerd reaches it [default: http://127.0.0.1:PORT, PORT from `listen`].
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// containerd's hosts directory as the host sees it (the CRI plugin's `config_path`).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub certs_dir: PathBuf,
    /// containerd's config file as the host sees it; only read, to check that `config_path` is set.
    #[arg(long, value_name = "FILE", default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
    /// Where the host's filesystem is mounted in this process (an init container mounts it at e.g. /host).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// containerd's connect timeout for wharf (`dial_timeout`, read by containerd 2.1+); empty leaves it out.
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub dial_timeout: String,
    /// Undo: restore every hosts.toml node-setup replaced, byte for byte, and delete the ones it created.
    #[arg(long)]
    pub remove: bool,
    /// Also create the cache directory (`data_dir` of the config, in this process's view) if missing and
    /// hand it to UID:GID, so a non-root wharf can write to a hostPath volume.
    #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
    pub data_owner: Option<(u32, u32)>,
    /// Only prepare the cache directory (`--data-owner`); leave containerd's files alone.
    #[arg(long, requires = "data_owner", conflicts_with = "remove")]
    pub only_data_dir: bool,
}

/// Why node-setup stopped. Problems with one registry's files are warnings, not errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// wharf's configuration did not load.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// `--mirror` is not an http(s) URL without a path.
    #[error("--mirror {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Mirror(String),
    /// `--dial-timeout` is not a Go duration (containerd 2.1+ would reject the whole hosts.toml).
    #[error("--dial-timeout {0:?}: expected a duration such as 1s or 500ms")]
    DialTimeout(String),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// What happened to one registry's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A new hosts.toml was written (no previous file).
    Created,
    /// An existing hosts.toml was kept as the backup and merged.
    Replaced,
    /// node-setup's hosts.toml was regenerated because the configuration changed.
    Updated,
    /// Nothing to do.
    Unchanged,
    /// The backup was renamed back to hosts.toml.
    Restored,
    /// node-setup's hosts.toml (and the directory it created) was deleted.
    Removed,
    /// Left alone; the reason is a warning.
    Skipped,
}

/// The outcome of a run: one action per registry directory touched, and warnings for the operator.
#[derive(Debug, Default)]
pub struct Report {
    /// Registry name and what was done to its directory.
    pub actions: Vec<(String, Action)>,
    /// Things the operator must know: a missing `config_path`, files left alone.
    pub warnings: Vec<String>,
}

/// Runs the subcommand and prints one line per registry (stdout) and the warnings (stderr).
pub fn run(args: &Args) -> Result<(), Error> {
    let report = execute(args)?;
    let mut out = io::stdout().lock();
    for (registry, action) in &report.actions {
        let _ = writeln!(out, "{registry}: {}", describe(action));
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn describe(action: &Action) -> &'static str {
    match action {
        Action::Created => "wrote hosts.toml",
        Action::Replaced => "kept the previous hosts.toml as hosts.toml.wharf-orig and wrote a merged one",
        Action::Updated => "updated hosts.toml",
        Action::Unchanged => "hosts.toml up to date",
        Action::Restored => "restored the previous hosts.toml",
        Action::Removed => "removed hosts.toml",
        Action::Skipped => "left alone (see warning)",
    }
}

/// Does the work of [`run`] without printing.
pub fn execute(args: &Args) -> Result<Report, Error> {
    let overrides = Overrides { upstreams: args.upstreams.clone(), ..Default::default() };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let certs = host_path(&args.root, &args.certs_dir);
    let mut report = Report::default();
    if args.remove {
        if certs.is_dir() {
            for registry in managed_dirs(&certs)? {
                let action = undo(&certs.join(&registry), &registry, &mut report.warnings)?;
                report.actions.push((registry, action));
            }
        }
        return Ok(report);
    }
    let mirror = match &args.mirror {
        Some(m) => m.trim_end_matches('/').to_string(),
        None => default_mirror(&config),
    };
    check_mirror(&mirror)?;
    if !args.dial_timeout.is_empty() && !is_go_duration(&args.dial_timeout) {
        return Err(Error::DialTimeout(args.dial_timeout.clone()));
    }
    if let Some((uid, gid)) = args.data_owner {
        prepare_data_dir(&config.data_dir, uid, gid)?;
        if args.only_data_dir {
            return Ok(report);
        }
    }
    report.warnings.extend(containerd_config_warnings(&args.root, &args.containerd_config, &args.certs_dir));
    fs::create_dir_all(&certs).map_err(io_err(&certs))?;
    let wanted: BTreeMap<&str, &str> =
        config.registries.iter().map(|(name, reg)| (name.as_str(), reg.url.as_str())).collect();
    for (name, server) in &wanted {
        if name.starts_with('.') || name.contains(['/', '\\']) {
            report.warnings.push(format!("registry {name:?} cannot be a directory name; skipped"));
            continue;
        }
        let action = apply(&certs.join(name), name, server, &mirror, &args.dial_timeout, &mut report.warnings)?;
        report.actions.push((name.to_string(), action));
    }
    for registry in managed_dirs(&certs)? {
        if !wanted.contains_key(registry.as_str()) {
            let action = undo(&certs.join(&registry), &registry, &mut report.warnings)?;
            report.actions.push((registry, action));
        }
    }
    Ok(report)
}

/// `path` (absolute, as the host sees it) inside the host filesystem mounted at `root`.
fn host_path(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// `http://127.0.0.1:PORT` for a wildcard `listen`, else `http://LISTEN`.
fn default_mirror(config: &Config) -> String {
    let listen = config.listen;
    if listen.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", listen.port())
    } else {
        format!("http://{listen}")
    }
}

fn check_mirror(mirror: &str) -> Result<(), Error> {
    let bad = || Error::Mirror(mirror.to_string());
    let url = url::Url::parse(mirror).map_err(|_| bad())?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.path() == "/"
        && url.query().is_none()
        && !mirror.contains('"');
    if ok { Ok(()) } else { Err(bad()) }
}

/// Go's `time.ParseDuration` syntax, unsigned: `1s`, `500ms`, `1m30s`, `1.5s`.
fn is_go_duration(s: &str) -> bool {
    let mut rest = s;
    while !rest.is_empty() {
        let number = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (n, tail) = rest.split_at(number);
        if n.is_empty() || n.starts_with('.') || n.ends_with('.') || n.matches('.').count() > 1 {
            return false;
        }
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"].into_iter().find(|u| tail.starts_with(u)) else {
            return false;
        };
        rest = &tail[unit.len()..];
    }
    !s.is_empty()
}

/// Parses `UID:GID`.
pub fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let parse = || -> Option<(u32, u32)> {
        let (u, g) = s.split_once(':')?;
        Some((u.parse().ok()?, g.parse().ok()?))
    };
    parse().ok_or_else(|| format!("expected UID:GID (numbers), got {s:?}"))
}

/// Creates `dir` (mode 0750) if missing and, when its owner is not `uid:gid`, hands it and everything under it
/// to `uid:gid` (an existing cache written by another user). A correctly owned directory is not walked.
fn prepare_data_dir(dir: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o750)).map_err(io_err(dir))?;
    }
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    // Children first: once a directory is handed over, root without CAP_DAC_READ_SEARCH may not list it.
    fn walk(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
        if fs::symlink_metadata(path).map_err(io_err(path))?.is_dir() {
            for entry in fs::read_dir(path).map_err(io_err(path))? {
                walk(&entry.map_err(io_err(path))?.path(), uid, gid)?;
            }
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err(path))
    }
    walk(dir, uid, gid)
}

/// The state node-setup records in the header of its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// A previous hosts.toml exists as [`BACKUP`].
    backup: bool,
    /// node-setup created the registry's directory (removed again by `--remove` if empty).
    created_dir: bool,
}

/// The state in `text`'s header if node-setup wrote it.
fn managed_state(text: &str) -> Option<State> {
    if !text.starts_with(MARKER) {
        return None;
    }
    let line = text.lines().take(4).find_map(|l| l.strip_prefix(STATE_KEY))?;
    let mut state = State { backup: false, created_dir: false };
    for word in line.split_whitespace() {
        match word {
            "previous=hosts.toml.wharf-orig" => state.backup = true,
            "created-dir=true" => state.created_dir = true,
            _ => {}
        }
    }
    Some(state)
}

/// Renders the hosts.toml for `registry`: wharf at `mirror` first (pull and resolve), then either
/// `server` (no previous file) or the previous file's own `server`, root keys and hosts, unchanged and in
/// their order. Deterministic: the same inputs give the same bytes.
pub fn render_hosts_toml(
    registry: &str,
    server: &str,
    mirror: &str,
    dial_timeout: &str,
    previous: Option<&str>,
    created_dir: bool,
) -> Result<String, toml_edit::TomlError> {
    let state = State { backup: previous.is_some(), created_dir };
    let mut out = format!(
        "{MARKER} for {registry}: containerd tries wharf on this node first, then the\n\
         # hosts below. `wharf node-setup --remove` restores the previous state; edits here are overwritten.\n\
         {STATE_KEY} previous={} created-dir={}\n",
        if state.backup { BACKUP } else { "none" },
        state.created_dir,
    );
    let mut ours = toml_edit::Table::new();
    ours.insert("capabilities", toml_edit::value(toml_edit::Array::from_iter(["pull", "resolve"])));
    if !dial_timeout.is_empty() {
        ours.insert("dial_timeout", toml_edit::value(dial_timeout));
    }
    match previous {
        None => {
            out.push_str(&format!("\nserver = {}\n", toml_edit::Value::from(server)));
            let mut doc = toml_edit::DocumentMut::new();
            let mut host = toml_edit::Table::new();
            host.set_implicit(true);
            host.insert(mirror, toml_edit::Item::Table(ours));
            doc.insert("host", toml_edit::Item::Table(host));
            out.push('\n');
            out.push_str(&doc.to_string());
        }
        Some(text) => {
            let mut doc: toml_edit::DocumentMut = text.parse()?;
            // Shift every parsed table down by two; the root keeps position 0 and wharf's host takes 1, so it
            // is printed right after the root keys (`server`, …) and before the previous hosts.
            shift_positions(doc.as_table_mut(), 2);
            doc.as_table_mut().set_position(0);
            ours.set_position(1);
            ours.decor_mut().set_prefix("\n");
            let host = doc.entry("host").or_insert_with(|| {
                let mut t = toml_edit::Table::new();
                t.set_implicit(true);
                toml_edit::Item::Table(t)
            });
            if let Some(host) = host.as_table_like_mut() {
                host.remove(mirror);
                host.insert(mirror, toml_edit::Item::Table(ours));
            }
            out.push_str("\n# The previous hosts.toml (kept as hosts.toml.wharf-orig), wharf first:\n");
            out.push_str(&doc.to_string());
        }
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

fn shift_positions(table: &mut toml_edit::Table, by: usize) {
    if let Some(p) = table.position() {
        table.set_position(p + by);
    }
    for (_, item) in table.iter_mut() {
        match item {
            toml_edit::Item::Table(t) => shift_positions(t, by),
            toml_edit::Item::ArrayOfTables(a) => {
                for t in a.iter_mut() {
                    shift_positions(t, by);
                }
            }
            _ => {}
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Makes `dir/hosts.toml` point at wharf first (see the module doc for the rules).
fn apply(
    dir: &Path,
    registry: &str,
    server: &str,
    mirror: &str,
    dial_timeout: &str,
    warnings: &mut Vec<String>,
) -> Result<Action, Error> {
    let (hosts, backup) = (dir.join(HOSTS), dir.join(BACKUP));
    remove_if_exists(&dir.join(TEMP))?;
    let current = read_optional(&hosts)?;
    let backup_text = read_optional(&backup)?;
    // (previous file, directory created by node-setup, the current hosts.toml is the operator's own)
    let (previous, created_dir, foreign) = match current.as_deref().map(|t| (t, managed_state(t))) {
        Some((text, None)) => (Some(text.to_string()), false, true),
        Some((_, Some(state))) => (backup_text.filter(|_| state.backup), state.created_dir, false),
        // No hosts.toml: a fresh directory, or a crash between keeping the backup and writing ours.
        None => (backup_text.clone(), backup_text.is_none() && !dir.exists(), false),
    };
    let wanted = match render_hosts_toml(registry, server, mirror, dial_timeout, previous.as_deref(), created_dir) {
        Ok(text) => text,
        Err(e) => {
            warnings.push(format!(
                "{}: not valid TOML (containerd cannot use it either), left untouched: {}",
                hosts.display(),
                e.to_string().trim()
            ));
            return Ok(Action::Skipped);
        }
    };
    if current.as_deref() == Some(wanted.as_str()) {
        return Ok(Action::Unchanged);
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let temp = dir.join(TEMP);
    write_synced(&temp, wanted.as_bytes())?;
    if foreign {
        // rename keeps the operator's file byte for byte, with its mode and owner.
        fs::rename(&hosts, &backup).map_err(io_err(&hosts))?;
    }
    fs::rename(&temp, &hosts).map_err(io_err(&hosts))?;
    sync_dir(dir)?;
    Ok(match (foreign, current.is_some()) {
        (true, _) => Action::Replaced,
        (false, true) => Action::Updated,
        (false, false) => Action::Created,
    })
}

/// Restores `dir` to what it was before node-setup.
fn undo(dir: &Path, registry: &str, warnings: &mut Vec<String>) -> Result<Action, Error> {
    let (hosts, backup) = (dir.join(HOSTS), dir.join(BACKUP));
    remove_if_exists(&dir.join(TEMP))?;
    let current = read_optional(&hosts)?;
    let state = current.as_deref().and_then(managed_state);
    let has_backup = backup.exists();
    let action = match (current.is_some(), state, has_backup) {
        (true, None, true) => {
            warnings.push(format!("{registry}: {} was changed by someone else; kept it and {BACKUP}", hosts.display()));
            return Ok(Action::Skipped);
        }
        (true, None, false) | (false, _, false) => return Ok(Action::Unchanged),
        (_, _, true) => {
            fs::rename(&backup, &hosts).map_err(io_err(&backup))?;
            Action::Restored
        }
        (true, Some(state), false) => {
            fs::remove_file(&hosts).map_err(io_err(&hosts))?;
            if state.created_dir {
                // Only if empty: certificates or other files put there meanwhile stay.
                let _ = fs::remove_dir(dir);
            }
            Action::Removed
        }
    };
    if dir.exists() {
        sync_dir(dir)?;
    }
    Ok(action)
}

/// Registry directories under `certs` holding a file of node-setup's (its hosts.toml or a backup).
fn managed_dirs(certs: &Path) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(certs).map_err(io_err(certs))? {
        let entry = entry.map_err(io_err(certs))?;
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let ours = read_optional(&dir.join(HOSTS))?.is_some_and(|t| managed_state(&t).is_some());
        if ours || dir.join(BACKUP).exists() {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// containerd CRI tables that can hold `registry.config_path`: 2.x (config version 3), 1.x (version 2), and
/// the version 1 format.
const CRI_PLUGINS: [&str; 3] = ["io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri", "cri"];

/// Warnings about containerd's config at `config` (a host path under `root`): is `certs_dir` in the CRI
/// plugin's `config_path`? containerd only reads hosts.toml for Kubernetes pulls when it is. Files named in
/// `imports` (literal paths, or `*` in the file name) are read too.
pub fn containerd_config_warnings(root: &Path, config: &Path, certs_dir: &Path) -> Vec<String> {
    let certs = certs_dir.to_string_lossy().trim_end_matches('/').to_string();
    let main = match fs::read_to_string(host_path(root, config)) {
        Ok(text) => text,
        Err(e) => {
            return vec![format!(
                "cannot read containerd's config {} ({e}): check that the CRI plugin's `config_path` includes \
                 {certs} (containerd 2.x reads it by default; 1.x needs {})",
                config.display(),
                snippet(2, &certs)
            )];
        }
    };
    let mut warnings = Vec::new();
    let mut tables = Vec::new();
    match main.parse::<toml::Table>() {
        Ok(t) => tables.push(t),
        Err(e) => return vec![format!("containerd's config {} does not parse: {e}", config.display())],
    }
    let version = tables[0].get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let imports: Vec<String> = tables[0]
        .get("imports")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    for pattern in imports {
        for path in expand_import(root, Path::new(&pattern)) {
            match fs::read_to_string(&path).map(|t| t.parse::<toml::Table>()) {
                Ok(Ok(t)) => tables.push(t),
                _ => warnings.push(format!("cannot read containerd config import {}", path.display())),
            }
        }
    }
    // Later files override earlier ones, as containerd merges imports.
    let mut config_path = None;
    let mut registry_section = false;
    let mut mirrors = false;
    for t in &tables {
        for plugin in CRI_PLUGINS {
            let registry = t.get("plugins").and_then(|p| p.get(plugin)).and_then(|p| p.get("registry"));
            if let Some(reg) = registry {
                registry_section = true;
                mirrors |= reg.get("mirrors").is_some();
                if let Some(p) = reg.get("config_path").and_then(|v| v.as_str()) {
                    config_path = Some(p.to_string());
                }
            }
        }
    }
    match config_path {
        Some(p) if p.split(':').any(|d| d.trim_end_matches('/') == certs) => {}
        Some(p) if p.is_empty() => warnings.push(format!(
            "containerd's `config_path` is empty in {}: containerd ignores {certs}; set {} and restart \
             containerd once (node-setup never restarts it)",
            config.display(),
            snippet(version, &certs)
        )),
        Some(p) => warnings.push(format!(
            "containerd's `config_path` is {p:?}, which does not include {certs}: run node-setup with \
             --certs-dir set to it, or set {} and restart containerd once",
            snippet(version, &certs)
        )),
        // containerd 2.x (config version 3) defaults to /etc/containerd/certs.d:/etc/docker/certs.d when the
        // registry section is absent.
        None if version >= 3 && !registry_section && certs == "/etc/containerd/certs.d" => {}
        None => warnings.push(format!(
            "containerd's config {} has no `config_path`, so containerd does not read {certs} for Kubernetes \
             pulls{}: add {} and restart containerd once (node-setup never restarts it)",
            config.display(),
            if mirrors {
                " (it uses the deprecated `registry.mirrors`, which cannot be combined with config_path)"
            } else {
                ""
            },
            snippet(version, &certs)
        )),
    }
    warnings
}

fn snippet(version: i64, certs: &str) -> String {
    let plugin = if version >= 3 { CRI_PLUGINS[0] } else { CRI_PLUGINS[1] };
    format!("`[plugins.\"{plugin}\".registry] config_path = \"{certs}\"`")
}

/// containerd `imports` entries: a path, or a glob with `*` in the last component.
fn expand_import(root: &Path, pattern: &Path) -> Vec<PathBuf> {
    let name = pattern.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = host_path(root, pattern.parent().unwrap_or(Path::new("/")));
    let Some((prefix, suffix)) = name.split_once('*') else {
        let p = parent.join(&name);
        return if p.exists() { vec![p] } else { Vec::new() };
    };
    let mut out: Vec<PathBuf> = fs::read_dir(&parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIRROR: &str = "http://127.0.0.1:5000";

    fn hosts_of(text: &str) -> Vec<String> {
        // Host keys in file order, as containerd orders them.
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("[host.\""))
            .map(|l| l.split('"').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn fresh_file_names_wharf_then_the_upstream() {
        let text = render_hosts_toml("docker.io", "https://registry-1.docker.io", MIRROR, "1s", None, true).unwrap();
        assert!(text.starts_with(MARKER), "{text}");
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = &parsed["host"][MIRROR];
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(host["dial_timeout"].as_str(), Some("1s"));
        assert_eq!(managed_state(&text), Some(State { backup: false, created_dir: true }));
        let no_timeout = render_hosts_toml("x", "https://x", MIRROR, "", None, false).unwrap();
        assert!(!no_timeout.contains("dial_timeout"), "{no_timeout}");
    }

    #[test]
    fn previous_file_is_merged_after_wharf_in_order() {
        let previous = "# corporate mirrors\nserver = \"https://registry-1.docker.io\"\nskip_verify = false\n\n\
                        [host.\"https://zeta.example\"]\n  capabilities = [\"pull\"]\n\n\
                        [host.\"https://alpha.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
        let text = render_hosts_toml("docker.io", "https://ignored", MIRROR, "1s", Some(previous), false).unwrap();
        assert_eq!(hosts_of(&text), [MIRROR, "https://zeta.example", "https://alpha.example"], "{text}");
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["server"].as_str(), Some("https://registry-1.docker.io"));
        assert_eq!(parsed["skip_verify"].as_bool(), Some(false));
        assert!(text.contains("# corporate mirrors"));
        // Root keys stay root keys: they must come before the first table header.
        let first_table = text.find("\n[").unwrap();
        assert!(text.find("skip_verify").unwrap() < first_table, "{text}");
        assert!(managed_state(&text).unwrap().backup);
    }

    #[test]
    fn previous_entry_for_the_mirror_is_replaced_not_duplicated() {
        let previous = format!("[host.\"https://a.example\"]\n[host.\"{MIRROR}\"]\n  capabilities = [\"push\"]\n");
        let text = render_hosts_toml("r", "https://r", MIRROR, "1s", Some(&previous), false).unwrap();
        assert_eq!(hosts_of(&text), [MIRROR, "https://a.example"], "{text}");
        let parsed: toml::Table = text.parse().unwrap();
        assert!(parsed.get("server").is_none(), "no server added to a file that had none");
    }

    #[test]
    fn previous_without_hosts_and_invalid_toml() {
        let text = render_hosts_toml("r", "https://r", MIRROR, "", Some("server = \"https://r2\"\n"), false).unwrap();
        assert_eq!(hosts_of(&text), [MIRROR]);
        assert!(render_hosts_toml("r", "https://r", MIRROR, "", Some("server = \n"), false).is_err());
    }

    #[test]
    fn rendering_is_deterministic() {
        let previous = "server = \"https://q\"\n[host.\"https://b\"]\n";
        let a = render_hosts_toml("q", "https://q", MIRROR, "1s", Some(previous), false).unwrap();
        let b = render_hosts_toml("q", "https://q", MIRROR, "1s", Some(previous), false).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn owner_and_mirror_parsing() {
        assert_eq!(parse_owner("65532:65532"), Ok((65532, 65532)));
        assert!(parse_owner("nonroot").is_err());
        assert!(check_mirror("http://127.0.0.1:5000").is_ok());
        assert!(check_mirror("https://wharf.local").is_ok());
        assert!(check_mirror("http://127.0.0.1:5000/v2").is_err());
        assert!(check_mirror("127.0.0.1:5000").is_err());
        for ok in ["1s", "500ms", "1m30s", "1.5s", "2h", "10us"] {
            assert!(is_go_duration(ok), "{ok}");
        }
        for bad in ["", "1", "s", "1sec", "-1s", "1.s", "1..5s", "1 s"] {
            assert!(!is_go_duration(bad), "{bad}");
        }
    }

    fn warnings_for(config: Option<&str>) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = config {
            fs::create_dir_all(dir.path().join("etc/containerd")).unwrap();
            fs::write(dir.path().join("etc/containerd/config.toml"), text).unwrap();
        }
        containerd_config_warnings(
            dir.path(),
            Path::new("/etc/containerd/config.toml"),
            Path::new("/etc/containerd/certs.d"),
        )
    }

    #[test]
    fn config_path_detection() {
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n";
        let w = warnings_for(Some(v2));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("no `config_path`") && w[0].contains("io.containerd.grpc.v1.cri"), "{w:?}");
        let v2_ok = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
                     config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        assert!(warnings_for(Some(v2_ok)).is_empty());
        let v2_other = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/x\"\n";
        assert!(warnings_for(Some(v2_other))[0].contains("does not include"));
        // containerd 2.x default config_path includes /etc/containerd/certs.d.
        assert!(warnings_for(Some("version = 3\n")).is_empty());
        let v3_mirrors = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry.mirrors.\"docker.io\"]\n\
                          endpoint = [\"https://m\"]\n";
        let w = warnings_for(Some(v3_mirrors));
        assert!(w[0].contains("registry.mirrors") && w[0].contains("io.containerd.cri.v1.images"), "{w:?}");
        assert!(warnings_for(None)[0].contains("cannot read"));
        assert!(warnings_for(Some("version = 2\n"))[0].contains("no `config_path`"));
    }

    #[test]
    fn config_path_in_an_import() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc/containerd");
        fs::create_dir_all(etc.join("conf.d")).unwrap();
        fs::write(etc.join("config.toml"), "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n").unwrap();
        fs::write(
            etc.join("conf.d/10-registry.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        let w = containerd_config_warnings(
            dir.path(),
            Path::new("/etc/containerd/config.toml"),
            Path::new("/etc/containerd/certs.d/"),
        );
        assert!(w.is_empty(), "{w:?}");
    }
}
