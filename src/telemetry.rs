//! The tracing subscriber: human-readable or JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//!
//! Lines are formatted on the thread that logs and appended to a shared buffer; a thread of its own writes
//! the buffer out [`FLUSH_EVERY`] after its first line (sooner when it fills) and sleeps while there is
//! none. No request waits on stderr, and a line per request at tens of thousands of requests a second costs a
//! few `write(2)`s and wake-ups a second rather than one each (`tracing-appender` woke its writer thread per
//! line: up to 3.5 µs of a manifest request's ~24).

use crate::config::LogFormat;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// How often buffered lines are written out.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// A buffer this full is written out at once.
const FLUSH_AT: usize = 256 * 1024;
/// Past this, new lines are dropped (and counted): a stalled log pipe must never stall requests nor grow
/// memory.
const BUFFER_LIMIT: usize = 8 * 1024 * 1024;

/// Installs the global subscriber once, at start-up. Keep the guard until exit: dropping it writes out what is
/// buffered.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a terminal: log collectors (and kubectl logs) would show the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = Batched::start(std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// The lines not yet written, shared by every logging thread and the flusher.
struct Shared {
    state: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
    /// Times the writer thread began to wait for a first line (it holds the lock until it waits): lets a
    /// test write a line only once the thread sleeps.
    idle_waits: AtomicU64,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closing: bool,
}

/// A `MakeWriter` for tracing-subscriber: each formatted line is appended to the shared buffer.
struct Batched(Arc<Shared>);

impl Batched {
    fn start(mut out: impl Write + Send + 'static) -> (Batched, LogGuard) {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
            idle_waits: AtomicU64::new(0),
        });
        let me = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("wharf-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let closing = {
                        // Idle until a first line arrives, then let more gather for a while.
                        let state = me.state.lock().unwrap();
                        me.idle_waits.fetch_add(1, Ordering::Relaxed);
                        let state = me.wake.wait_while(state, |s| s.lines.is_empty() && !s.closing);
                        let (mut state, _) = me
                            .wake
                            .wait_timeout_while(state.unwrap(), FLUSH_EVERY, |s| s.lines.len() < FLUSH_AT && !s.closing)
                            .unwrap();
                        std::mem::swap(&mut state.lines, &mut spare);
                        state.closing
                    };
                    let dropped = me.dropped.swap(0, Ordering::Relaxed);
                    if dropped > 0 {
                        let _ = writeln!(spare, "wharf: {dropped} log lines dropped: stderr was not keeping up");
                    }
                    // A failed write loses these lines only; the next ones are tried again.
                    let _ = out.write_all(&spare).and_then(|()| out.flush());
                    spare.clear();
                    if spare.capacity() > FLUSH_AT * 4 {
                        spare = Vec::new();
                    }
                    if closing {
                        return;
                    }
                }
            })
            .expect("spawn the log writer thread");
        (Batched(shared.clone()), LogGuard { shared, flusher: Some(flusher) })
    }
}

/// Each formatted line is one `write` (tracing-subscriber formats it whole first).
impl Write for &Shared {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.state.lock().unwrap();
        if state.lines.len() + line.len() > BUFFER_LIMIT {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        let before = state.lines.len();
        state.lines.extend_from_slice(line);
        // The writer thread waits for a first line, then for the buffer to fill or FLUSH_EVERY to pass.
        if before == 0 || (before < FLUSH_AT && state.lines.len() >= FLUSH_AT) {
            self.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hands out a borrow of the shared buffer: no reference count touched per line.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Batched {
    type Writer = &'a Shared;

    fn make_writer(&'a self) -> Self::Writer {
        &self.0
    }
}

/// Writes out the buffered lines and stops the writer thread when dropped (at exit).
pub struct LogGuard {
    shared: Arc<Shared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().closing = true;
        self.shared.wake.notify_one();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
    }
}

/// An error and its sources on one line, joined with `: ` (a source whose text the line already ends with
/// is skipped): what logs and error answers show, since many errors say little without their causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read while the writer thread owns it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_in_order_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = Batched::start(sink.clone());
        for i in 0..1000 {
            (&*writer.0).write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn lines_reach_the_output_without_the_guard_being_dropped() {
        let sink = Sink::default();
        let (writer, _guard) = Batched::start(sink.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // Each line is written while the writer thread sleeps with nothing to write: the line must wake it.
        for (n, expected) in [(1, &b"one line\n"[..]), (2, &b"one line\ntwo lines\n"[..])] {
            wait_for("the writer thread never went idle", &|| writer.0.idle_waits.load(Ordering::Relaxed) >= n);
            let line: &[u8] = if n == 1 { b"one line\n" } else { b"two lines\n" };
            (&*writer.0).write_all(line).unwrap();
            wait_for("a buffered line was never written", &|| sink.0.lock().unwrap().len() == expected.len());
            assert_eq!(&sink.0.lock().unwrap()[..], expected);
        }
    }

    #[test]
    fn a_stalled_output_drops_lines_past_the_limit_and_says_so() {
        // An output that blocks until released, like a full pipe nobody reads.
        struct Stalled(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stalled {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (open, cv) = &*self.0;
                let _open = cv.wait_while(open.lock().unwrap(), |o| !*o).unwrap();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (writer, guard) = Batched::start(Stalled(gate.clone(), sink.clone()));
        // The first line is taken by the writer thread, which then blocks in the output.
        (&*writer.0).write_all(b"first\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !writer.0.state.lock().unwrap().lines.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the writer thread never took the first line");
            std::thread::sleep(Duration::from_millis(5));
        }
        // More than the limit, from another thread: were logging to wait for the output, it would never end.
        let logger = writer.0.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = [vec![b'x'; 1023], vec![b'\n']].concat();
            for _ in 0..BUFFER_LIMIT / 1024 + 100 {
                (&*logger).write_all(&line).unwrap();
            }
            done.send(()).unwrap();
        });
        finished.recv_timeout(Duration::from_secs(60)).expect("logging waited for the stalled output");
        let dropped = writer.0.dropped.load(Ordering::Relaxed);
        assert!(dropped >= 100, "only {dropped} lines dropped past the limit");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("first\n"), "{}", &out[..20]);
        assert!(out.contains(&format!("wharf: {dropped} log lines dropped")), "the drop is not reported");
        assert!(out.len() <= BUFFER_LIMIT + 200, "more than the limit was kept: {}", out.len());
    }
}
