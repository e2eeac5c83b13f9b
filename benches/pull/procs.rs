//! Child processes of the benchmark and what `/proc` says about them.
//!
//! * Every child is spawned from one dedicated thread that never exits, with `PR_SET_PDEATHSIG=SIGKILL`, so
//!   it dies with the bench process however that ends (the signal fires when the spawning thread exits).
//! * Every pid is kept in a global list; [`kill_all`] (called at the end of `main`, from the panic hook and on
//!   SIGINT/SIGTERM) kills each one by pid. nginx workers are added once discovered (they are nginx's
//!   children, not ours, so PDEATHSIG does not reach them).
//! * [`cpu_seconds`] reads `utime + stime`, [`rss_kib`] reads `VmRSS`/`VmHWM`; [`RssSampler`] keeps the
//!   highest sum of `VmRSS` over a set of pids while a run lasts.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

static PIDS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Removed by [`abort_cleanup`] (the run directory, with its GiB of blobs).
static SCRATCH: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);
static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

/// Adds `pid` to the list [`kill_all`] kills.
pub fn register(pid: i32) {
    PIDS.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
}

/// Removes `pid` (it was reaped).
pub fn unregister(pid: i32) {
    PIDS.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
}

/// SIGKILLs every registered pid that is still alive.
pub fn kill_all() {
    let pids: Vec<i32> = std::mem::take(&mut *PIDS.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect();
    for pid in pids {
        // SAFETY: plain syscall on a pid we started (or a worker of one).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Sets the directory [`abort_cleanup`] removes (None: keep it).
pub fn set_scratch(dir: Option<std::path::PathBuf>) {
    *SCRATCH.lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

/// On a panic or signal: kill every child, then remove the scratch directory.
fn abort_cleanup() {
    kill_all();
    std::thread::sleep(Duration::from_millis(100));
    if let Some(d) = SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Installs the panic hook (print, kill every child, exit 101) and a SIGINT/SIGTERM watcher thread.
pub fn install_cleanup() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        abort_cleanup();
        std::process::exit(101);
    }));
    // Block SIGINT/SIGTERM in this (main) thread before any other thread exists so every thread inherits
    // the mask, and let one thread take them with sigwait.
    // SAFETY: signal-mask manipulation with a zeroed, then filled, sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::Builder::new()
            .name("bench-signals".into())
            .spawn(move || {
                let mut sig = 0;
                libc::sigwait(&set, &mut sig);
                eprintln!("\nbench: signal {sig}: killing child processes");
                abort_cleanup();
                std::process::exit(130);
            })
            .expect("spawn signal thread");
    }
}

/// Spawns `cmd` from the spawner thread (see the module docs) and registers its pid.
pub fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; we also unblock the signals the parent blocked.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("bench-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let child = cmd.spawn();
                    if let Ok(c) = &child {
                        register(c.id() as i32);
                    }
                    let _ = reply.send(child);
                }
                // The sender lives in a static: never reached, and PDEATHSIG must not fire anyway.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    reply_rx.recv().map_err(|_| std::io::Error::other("spawner thread gone"))?
}

/// A child process with its stdout/stderr kept (last lines) and killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    log: Arc<Mutex<Vec<String>>>,
    /// Sent the remainder of the first output line containing the ready pattern.
    ready: Option<mpsc::Receiver<String>>,
    /// Highest `VmHWM` seen when the process was stopped (KiB).
    pub final_hwm_kib: u64,
}

impl Proc {
    /// Spawns `cmd` with piped output; the first line (stdout or stderr) containing `ready_pattern` is
    /// available from [`Proc::wait_ready`].
    pub fn spawn(name: &str, mut cmd: Command, ready_pattern: Option<&str>) -> Proc {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = spawn(cmd).unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pattern = ready_pattern.map(str::to_string);
        let readers: Vec<Box<dyn std::io::Read + Send>> =
            vec![Box::new(child.stdout.take().expect("stdout")), Box::new(child.stderr.take().expect("stderr"))];
        for stream in readers {
            let (log, tx, pattern) = (log.clone(), tx.clone(), pattern.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(p) = &pattern
                        && let Some(rest) = line.split(p.as_str()).nth(1)
                    {
                        let _ = tx.send(rest.to_string());
                    }
                    let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() >= 200 {
                        l.remove(0);
                    }
                    l.push(line);
                }
            });
        }
        Proc { child: Some(child), name: name.to_string(), log, ready: ready_pattern.map(|_| rx), final_hwm_kib: 0 }
    }

    /// Waits for the ready line; panics with the log if it does not come within `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> String {
        let rx = self.ready.take().expect("no ready pattern");
        match rx.recv_timeout(timeout) {
            Ok(rest) => rest,
            Err(_) => panic!("{} did not start within {timeout:?}:\n{}", self.name, self.log_tail(40)),
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// The last `n` output lines.
    pub fn log_tail(&self, n: usize) -> String {
        let l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        l[l.len().saturating_sub(n)..].join("\n")
    }

    /// Sends `sig`, waits up to `grace` for the exit, then SIGKILLs. Records `VmHWM` first.
    pub fn stop(&mut self, sig: i32, grace: Duration) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id() as i32;
        self.final_hwm_kib = rss_kib(pid).map(|r| r.1).unwrap_or(0);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, sig) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                unregister(pid);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        unregister(pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL, Duration::from_secs(5));
    }
}

/// `utime + stime` of `pid` in seconds (0 if it is gone).
pub fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Sum of [`cpu_seconds`] over `pids`.
pub fn cpu_seconds_sum(pids: &[i32]) -> f64 {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

/// `(VmRSS, VmHWM)` of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Pids whose parent is `parent` (nginx workers).
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid =
            stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|v| v.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Samples the sum of `VmRSS` over a set of pids every 20 ms on its own thread; [`RssSampler::finish`]
/// returns the peak in KiB.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    /// Starts sampling `pids`.
    pub fn start(pids: Vec<i32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            // Bounded: at most one hour of samples.
            for _ in 0..180_000 {
                let sum: u64 = pids.iter().filter_map(|&p| rss_kib(p)).map(|r| r.0).sum();
                peak = peak.max(sum);
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssSampler { stop, handle: Some(handle) }
    }

    /// Stops sampling; the peak `VmRSS` sum in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A free TCP port on 127.0.0.1 (for nginx, which cannot listen on port 0 and report it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A free TCP port on `ip` (bound and released; the caller's server binds it right after).
pub fn free_port_on(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().expect("local addr").port()
}

/// Name of the file in a run directory listing pids that outlive their parent (nginx workers).
pub const ORPHAN_PIDS_FILE: &str = "orphan-pids";

/// Removes `target/bench-tmp/run-PID` directories whose bench process is gone (left by a killed run),
/// first killing the nginx workers that run listed in [`ORPHAN_PIDS_FILE`] if they are still nginx.
pub fn remove_stale_run_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("run-") else { continue };
        if std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        let listed = std::fs::read_to_string(e.path().join(ORPHAN_PIDS_FILE)).unwrap_or_default();
        for pid in listed.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("nginx") {
                eprintln!("bench: killing nginx worker {pid} left by a killed run");
                // SAFETY: plain syscall; the pid was checked to be an nginx process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        eprintln!("bench: removing stale {}", e.path().display());
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// Runs `cmd` to completion (through [`spawn`]), killing it after `timeout`; `(success, stdout, stderr)`.
pub fn run_output(mut cmd: Command, timeout: Duration) -> (bool, String, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match spawn(cmd) {
        Ok(c) => c,
        Err(e) => return (false, String::new(), e.to_string()),
    };
    let pid = child.id() as i32;
    let read = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
    let err = read(child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
    let deadline = Instant::now() + timeout;
    let mut ok = false;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                ok = status.success();
                break;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    unregister(pid);
    (ok, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}
