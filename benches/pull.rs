//! `cargo bench --bench pull [-- FLAGS]`: the pull benchmark of issue 3 (see benches/README.md).
//!
//! This file owns the command line ([`Opts`]), the run directory under `target/tmp/bench-pull/`, start-up
//! (origin, seeding, shim, peers), the scenario loop and the result file
//! `target/bench-results/pull-<timestamp>.md`. Modules:
//! `procs` (child processes, `/proc`), `origin` (docker-registry + seeding), `shim` (throttling proxy),
//! `peers` (wharf, registry-proxy, nginx, direct, the three-node sets, wharf with a bucket), `bucket` (the
//! S3 server of scenario 9), `cri` (containerd and page-cache tools of scenario 12), `client` (load
//! generator), `scenarios`, `report`.

#[path = "pull/bucket.rs"]
mod bucket;
#[path = "pull/client.rs"]
mod client;
#[path = "pull/cri.rs"]
mod cri;
#[path = "pull/origin.rs"]
mod origin;
#[path = "pull/peers.rs"]
mod peers;
#[path = "pull/procs.rs"]
mod procs;
#[path = "pull/report.rs"]
mod report;
#[path = "pull/scenarios.rs"]
mod scenarios;
#[path = "pull/shim.rs"]
mod shim;

use client::Mode;
use origin::{GIB, MIB, Sizes};
use peers::PeerKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo bench --bench pull -- [FLAGS]

  --quick               small smoke run (~1-2 min): 10 MiB + 4×25 MiB app, 200 MiB large layer, 200 MB/s,
                        herd 2,4, 10 repositories, ab 1 s
  --scenarios LIST      e.g. 1,2,7 (default: 1,2,3,4,5,6,7,8,9,10,11,12): 1 cold single pull, 2 warm single pull,
                        3 cold herd, 4 late joiners, 5 many images, 6 large layer with 4 clients,
                        7 manifest req/s, 8 cluster, 9 refill an empty node from an S3 bucket (s3s-fs from
                        target/s3s-fs/bin or $WHARF_S3S_FS; skipped if missing) vs from the upstream,
                        10 warm pulls with many idle keep-alive connections held open, 11 a cold fill's
                        CPU against the floor (receive with curl, hash with openssl, write with dd),
                        for each origin --peers names: wharf (the upstream), cluster (a peer), bucket;
                        12 the kubelet's pull: containerd's CRI PullImage of a one-layer image (a tar of the
                        large layer's size) through a warm wharf vs from the origin registry, blob pages cold
                        and warm (needs containerd, wharf among --peers; skipped otherwise)
  --peers LIST          wharf,proxy,nginx,direct,cluster,independent,bucket (default: all)
  --rates LIST          per-connection upstream MB/s (default: 50,200; --quick: 200)
  --latency-ms N        added before every upstream response (default: 20)
  --herd LIST           cold-herd client counts (default: 2,4,8,16)
  --large-mib N         size of the large layer and of scenario 12's (default: 1024)
  --huge                also seed and pull a 4 GiB layer (scenarios 1, 2, 6)
  --chunk-mib N         containerd / bounded-range chunk size (default: 8)
  --parallel N          containerd / bounded-range parallelism P (default: 3)
  --downloads N         concurrent requests per client, like max_concurrent_downloads (default: 3)
  --many-repos N        scenario 5 repositories (default: 50)
  --many-clients N      scenario 5 clients (default: 16)
  --idle-connections N  scenario 10 idle keep-alive connections (default: 10000; --quick: 1000)
  --large-clients N     scenario 6 clients (default: 4)
  --cluster-clients N   scenario 8 herd, spread over the 3 nodes (default: 12)
  --refill-large        scenario 9 also refills the large layer (default: bench/app only)
  --ab-secs N           seconds per ab run (default: 5)
  --ab-concurrency N    ab -c (default: 16)
  --repeat N            runs per figure (warm: scenarios 2, 6; 8; 9; 12), the median reported (default: 3;
                        --quick: 1)
  --ab-runs N           ab runs per figure, the best one reported (default: 2; --quick: 1)
  --request-log         keep wharf's per-request log lines on and print wharf's last 200 log lines when
                        it stops (default: off, like the peers)
  --keep                keep the run directory (target/tmp/bench-pull/run-PID) for inspection
";

/// Command-line options.
#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    pub scenarios: Vec<u32>,
    pub peers: Vec<PeerKind>,
    pub rates: Vec<u64>,
    pub latency_ms: u64,
    pub herd: Vec<usize>,
    pub sizes: Sizes,
    pub chunk: u64,
    pub par: usize,
    pub downloads: usize,
    pub many_clients: usize,
    /// Scenario 10: idle keep-alive connections held open.
    pub idle_connections: usize,
    pub many_pulls: usize,
    pub large_clients: usize,
    pub cluster_clients: usize,
    pub refill_large: bool,
    pub ab_secs: u64,
    pub ab_concurrency: usize,
    pub ab_runs: usize,
    pub repeat: usize,
    pub request_log: bool,
    pub keep: bool,
    pub cold_modes: Vec<Mode>,
    pub warm_modes: Vec<Mode>,
    /// The flags as given, for the report.
    pub command: String,
}

fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Vec<T> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse().unwrap_or_else(|_| die(&format!("{flag}: cannot parse {s:?}"))))
        .collect()
}

fn die(msg: &str) -> ! {
    eprintln!("bench: {msg}\n\n{USAGE}");
    std::process::exit(2);
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            quick,
            scenarios: (1..=12).collect(),
            peers: vec![
                PeerKind::Wharf,
                PeerKind::Proxy,
                PeerKind::Nginx,
                PeerKind::Direct,
                PeerKind::Cluster,
                PeerKind::Independent,
                PeerKind::Bucket,
            ],
            rates: if quick { vec![200] } else { vec![50, 200] },
            latency_ms: 20,
            herd: if quick { vec![2, 4] } else { vec![2, 4, 8, 16] },
            sizes: Sizes {
                app: if quick {
                    vec![10 * MIB, 25 * MIB, 25 * MIB, 25 * MIB, 25 * MIB]
                } else {
                    vec![10 * MIB, 100 * MIB, 100 * MIB, 100 * MIB, 100 * MIB]
                },
                large: if quick { 200 * MIB } else { GIB },
                huge: None,
                cri: None,
                many_repos: if quick { 10 } else { 50 },
            },
            chunk: 8 * MIB,
            par: 3,
            downloads: 3,
            many_clients: if quick { 4 } else { 16 },
            idle_connections: if quick { 1000 } else { 10_000 },
            many_pulls: if quick { 2 } else { 3 },
            large_clients: 4,
            cluster_clients: 12,
            refill_large: false,
            ab_secs: if quick { 1 } else { 5 },
            ab_concurrency: 16,
            ab_runs: if quick { 1 } else { 2 },
            repeat: if quick { 1 } else { 3 },
            request_log: false,
            keep: false,
            cold_modes: Vec::new(),
            warm_modes: Vec::new(),
            command: String::new(),
        };
        let mut shown = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--bench" {
                continue; // added by cargo bench
            }
            shown.push(a.clone());
            let mut value = || {
                let v = it.next().unwrap_or_else(|| die(&format!("{a} needs a value"))).clone();
                shown.push(v.clone());
                v
            };
            let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| die(&format!("{a}: not a number: {v}"))) };
            match a.as_str() {
                "--quick" => {}
                "--scenarios" => o.scenarios = list(a, &value()),
                "--peers" => {
                    o.peers = value()
                        .split(',')
                        .map(|p| PeerKind::parse(p).unwrap_or_else(|| die(&format!("unknown peer {p}"))))
                        .collect()
                }
                "--rates" => o.rates = list(a, &value()),
                "--latency-ms" => o.latency_ms = num(value()),
                "--herd" => o.herd = list(a, &value()),
                "--large-mib" => o.sizes.large = num(value()) * MIB,
                "--huge" => o.sizes.huge = Some(4 * GIB),
                "--chunk-mib" => o.chunk = num(value()) * MIB,
                "--parallel" => o.par = num(value()) as usize,
                "--downloads" => o.downloads = num(value()) as usize,
                "--many-repos" => o.sizes.many_repos = num(value()) as usize,
                "--many-clients" => o.many_clients = num(value()) as usize,
                "--idle-connections" => o.idle_connections = num(value()) as usize,
                "--large-clients" => o.large_clients = num(value()) as usize,
                "--cluster-clients" => o.cluster_clients = (num(value()) as usize).max(1),
                "--refill-large" => o.refill_large = true,
                "--ab-secs" => o.ab_secs = num(value()),
                "--ab-concurrency" => o.ab_concurrency = num(value()) as usize,
                "--repeat" => o.repeat = (num(value()) as usize).max(1),
                "--ab-runs" => o.ab_runs = (num(value()) as usize).max(1),
                "--request-log" => o.request_log = true,
                "--keep" => o.keep = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => die(&format!("unknown flag {other}")),
            }
        }
        if o.scenarios.contains(&12) {
            // Seeded only when asked for: a real tar of the large layer's size.
            o.sizes.cri = Some(o.sizes.large);
        }
        if o.rates.is_empty() || o.herd.is_empty() || o.sizes.many_repos == 0 || o.chunk == 0 {
            die("empty --rates/--herd or zero sizes");
        }
        o.cold_modes = vec![Mode::Whole, Mode::Chunked(o.chunk, o.par)];
        o.warm_modes = vec![Mode::Whole, Mode::Chunked(o.chunk, o.par), Mode::Ranges(o.chunk, o.par), Mode::Multi(4)];
        o.command = format!("cargo bench --bench pull -- {}", shown.join(" ")).trim_end_matches(" -- ").to_string();
        o
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench targets without `--bench`: nothing to do there.
        println!("pull benchmark: run it with `cargo bench --bench pull` (see benches/README.md)");
        return;
    }
    procs::install_cleanup();
    let opts = Opts::parse(&args);
    let mut missing = Vec::new();
    for (bin, pkg) in needed_tools(&opts) {
        if !installed(bin) {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        eprintln!("bench: missing tools; install them with:\n  apt-get install {}", missing.join(" "));
        std::process::exit(1);
    }
    if opts.scenarios.contains(&9)
        && let Some(why) = bucket::missing()
    {
        // Said now, not only after the scenarios before it have run.
        eprintln!("bench: scenario 9 will be skipped: {why}");
    }
    // The clients' task polls are long (a poll reads and hashes up to a budget's worth of chunks, about a
    // millisecond), so tokio's default of checking for I/O events every 61 polls left a late joiner's
    // connect and response unnoticed for 50-300 ms while three other clients streamed: the client, not the
    // server, was slow. Checking every 2 polls costs one epoll_wait per two polls.
    let rt = tokio::runtime::Builder::new_multi_thread().event_interval(2).enable_all().build().expect("runtime");
    rt.block_on(run(opts));
    procs::kill_all();
}

/// Whether `bin` is on `PATH` (or in `/usr/sbin`, `/sbin`).
fn installed(bin: &str) -> bool {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .any(|d| Path::new(d).join(bin).is_file())
}

/// `(binary, Debian package)` the chosen scenarios and peers run: the origin always, nginx for the warm
/// and manifest scenarios (2, 6, 7) when it is a peer, `ab` and `wrk` for scenario 7.
fn needed_tools(opts: &Opts) -> Vec<(&'static str, &'static str)> {
    let mut tools = vec![("docker-registry", "docker-registry")];
    if opts.peers.contains(&PeerKind::Nginx) && opts.scenarios.iter().any(|s| [2, 6, 7].contains(s)) {
        tools.push(("nginx", "nginx"));
    }
    if opts.scenarios.contains(&7) {
        tools.push(("ab", "apache2-utils"));
        tools.push(("wrk", "wrk"));
    }
    if opts.scenarios.contains(&11) {
        tools.push(("curl", "curl"));
        tools.push(("openssl", "openssl"));
    }
    tools
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`.
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target dir").to_path_buf()
}

async fn run(opts: Opts) {
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let base = target_dir().join("tmp/bench-pull");
    std::fs::create_dir_all(&base).expect("create bench dir");
    procs::remove_stale_run_dirs(&base);
    let run_dir = base.join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("create run dir");
    procs::set_scratch((!opts.keep).then(|| run_dir.clone()));
    eprintln!("bench: run directory {}", run_dir.display());

    let origin = origin::Registry::start(&run_dir.join("origin"), None).await;
    let catalog = origin::seed(&origin, &opts.sizes, &run_dir.join("scratch")).await;
    let shim = shim::Shim::start(origin.addr, 0, Duration::from_millis(opts.latency_ms));
    let peers = peers::Peers::new(&run_dir, &shim.url(), &origin, &catalog, opts.request_log);
    let (origin_root, origin_url) = (origin.root.clone(), origin.url());
    let mut ctx =
        scenarios::Ctx { opts: opts.clone(), shim, peers, catalog, origin_root, origin_url, sections: Vec::new() };
    let mut timings = Vec::new();
    for s in opts.scenarios.clone() {
        let t = Instant::now();
        match s {
            1 => scenarios::cold_single(&mut ctx).await,
            2 => scenarios::warm_single(&mut ctx).await,
            3 => scenarios::cold_herd(&mut ctx).await,
            4 => scenarios::late_joiners(&mut ctx).await,
            5 => scenarios::many_images(&mut ctx).await,
            6 => scenarios::large_layer(&mut ctx).await,
            7 => scenarios::manifests(&mut ctx).await,
            8 => scenarios::cluster(&mut ctx).await,
            9 => scenarios::refill(&mut ctx).await,
            10 => scenarios::idle_connections(&mut ctx).await,
            11 => scenarios::fill_floor(&mut ctx).await,
            12 => scenarios::cri_pull(&mut ctx).await,
            other => eprintln!("bench: no scenario {other}"),
        }
        timings.push(format!("{s}: {:.0} s", t.elapsed().as_secs_f64()));
    }
    let hwm = ctx.peers.wharf_peak_kib();
    ctx.peers.stop_all();
    let mut checks_md = String::new();
    if opts.scenarios.iter().any(|s| (1..=7).contains(s)) {
        checks_md.push_str(&report::render_checks("Targets of issue 3", &report::checks(&ctx.sections, hwm)));
    }
    if opts.scenarios.contains(&8) {
        let checks = report::cluster_checks(&ctx.sections);
        checks_md.push_str(&report::render_checks("Targets of issue 12 (cluster)", &checks));
    }
    println!("{checks_md}");

    let total = started.elapsed();
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = header(&opts, total, &load_before, &load_after, &timings);
    md.push_str(&checks_md);
    for s in &ctx.sections {
        md.push_str(&report::render_section(s));
    }
    let results = target_dir().join("bench-results");
    std::fs::create_dir_all(&results).expect("create bench-results");
    let file = results.join(format!("pull-{}.md", timestamp(true)));
    std::fs::write(&file, &md).expect("write results");
    eprintln!("bench: results written to {} (total {:.0} s)", file.display(), total.as_secs_f64());

    drop(ctx);
    drop(origin);
    if opts.keep {
        eprintln!("bench: kept {}", run_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    let mut c = std::process::Command::new(cmd);
    c.args(args);
    let (_, out, err) = procs::run_output(c, Duration::from_secs(10));
    format!("{out}{err}").lines().next().unwrap_or("?").trim().to_string()
}

/// The first line of `cmd args` (a version), or that `cmd` is not installed (the run did not need it).
fn tool_version(cmd: &str, args: &[&str]) -> String {
    if installed(cmd) { first_line(cmd, args) } else { format!("{cmd} not installed") }
}

/// `git` commit of the work tree and whether `src/` has uncommitted changes (read-only git commands).
fn wharf_revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let rev = first_line("git", &["-C", dir, "log", "-1", "--format=%h %s"]);
    let mut c = std::process::Command::new("git");
    c.args(["-C", dir, "status", "--porcelain", "--", "src"]);
    let (ok, out, _) = procs::run_output(c, Duration::from_secs(10));
    let dirty = if !ok {
        " (not a git work tree)"
    } else if out.trim().is_empty() {
        ""
    } else {
        " + uncommitted changes in src/"
    };
    format!("{rev}{dirty}")
}

fn header(opts: &Opts, total: Duration, load_before: &str, load_after: &str, timings: &[String]) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "## Pull benchmark, {}\n\n\
         - command: `{}`\n\
         - machine: {cores} cores ({cpu}), {mem} RAM, Linux {}, loopback only; load average {} before, {} after\n\
         - wharf: {}\n\
         - tools: {}; {}; {}\n\
         - upstream: shim with {} MB/s per connection, +{} ms before each response\n\
         - clients: {} concurrent requests each; containerd mode C = {} MiB, P = {}\n\
         - total time {:.0} s (scenario: {})\n\n",
        timestamp(false),
        opts.command,
        kernel.trim(),
        load(load_before),
        load(load_after),
        wharf_revision(),
        tool_version("docker-registry", &["--version"]),
        tool_version("nginx", &["-v"]),
        tool_version("ab", &["-V"]),
        opts.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" and "),
        opts.latency_ms,
        opts.downloads,
        opts.chunk / MIB,
        opts.par,
        total.as_secs_f64(),
        timings.join(", ")
    )
}

/// UTC now: `20260101T120000Z` (compact) or `2026-01-01 12:00 UTC`.
fn timestamp(compact: bool) -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, min, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if compact {
        format!("{y:04}{m:02}{d:02}T{h:02}{min:02}{s:02}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02} UTC")
    }
}
