//! How many range requests a ranged fill keeps in flight. Many upstreams and CDNs limit each connection's
//! rate, others only their total: the fill starts with one request, doubles the number while each doubling
//! raises the aggregate rate, and goes back to the last number that paid as soon as one does not (up to
//! `upstream.fill_concurrency`). An upstream that limits each connection is filled near its total capacity;
//! one that does not is not sent more requests than help.

use std::time::{Duration, Instant};

/// A doubling pays when the aggregate rate rises by at least this factor (a perfect doubling gives 2).
const GAIN: f64 = 1.2;

/// The shortest measurement window: long enough to see several reads, short enough that the ramp is over
/// within the first second or two of a large blob.
pub const MIN_WINDOW: Duration = Duration::from_millis(100);

/// The ramp of one ranged fill.
#[derive(Debug)]
pub struct Ramp {
    limit: usize,
    cap: usize,
    /// The last measured (limit, bytes per second).
    prev: Option<(usize, f64)>,
    /// Where the current measurement started (time, bytes received), once every request is under way.
    window: Option<(Instant, u64)>,
    /// No more changes: at the cap, past the point where requests paid, or too few chunks left to tell.
    settled: bool,
    started: Instant,
    /// (milliseconds since the start, limit) at each change, for the fill's log line.
    history: Vec<(u64, usize)>,
}

impl Ramp {
    /// A ramp starting at one request in flight, growing to at most `cap`.
    pub fn new(cap: usize, now: Instant) -> Ramp {
        Ramp {
            limit: 1,
            cap: cap.max(1),
            prev: None,
            window: None,
            settled: cap <= 1,
            started: now,
            history: vec![(0, 1)],
        }
    }

    /// Range requests to keep in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes a measurement at `now`: `received` bytes so far; `under_way` when every request in flight has
    /// had its first byte; `full` when `limit` requests are in flight (fewer: the last chunks, nothing left
    /// to learn); `window` is how long to measure (at least [`MIN_WINDOW`]; longer on a slow first byte).
    pub fn observe(&mut self, now: Instant, received: u64, under_way: bool, full: bool, window: Duration) {
        if self.settled {
            return;
        }
        if !full {
            self.settled = true;
            return;
        }
        let Some((t0, b0)) = self.window else {
            if under_way {
                self.window = Some((now, received));
            }
            return;
        };
        let elapsed = now.saturating_duration_since(t0);
        if elapsed < window.max(MIN_WINDOW) {
            return;
        }
        let rate = received.saturating_sub(b0) as f64 / elapsed.as_secs_f64();
        match self.prev {
            Some((limit, prev_rate)) if rate < prev_rate * GAIN => {
                // The last doubling did not pay: back to the number that did, and stay there.
                self.set(limit, now);
                self.settled = true;
            }
            _ if self.limit >= self.cap => {
                self.settled = true;
            }
            _ => {
                self.prev = Some((self.limit, rate));
                self.set((self.limit * 2).min(self.cap), now);
            }
        }
    }

    fn set(&mut self, limit: usize, now: Instant) {
        if limit != self.limit {
            self.limit = limit;
            self.window = None;
            self.history.push((now.saturating_duration_since(self.started).as_millis() as u64, limit));
        }
    }

    /// The changes so far, as `limit@ms` (`1@0,2@104,4@209,2@316`).
    pub fn history(&self) -> String {
        self.history.iter().map(|(ms, n)| format!("{n}@{ms}")).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a ramp against an origin whose aggregate rate for `n` requests is `rate(n)` bytes per second,
    /// ticking every 10 ms for 5 s; returns the final limit and the history.
    fn run(cap: usize, rate: impl Fn(usize) -> f64) -> (usize, String) {
        let start = Instant::now();
        let mut ramp = Ramp::new(cap, start);
        let mut received = 0.0;
        for tick in 1..=500 {
            received += rate(ramp.limit()) * 0.01;
            let now = start + Duration::from_millis(10 * tick);
            ramp.observe(now, received as u64, true, true, MIN_WINDOW);
        }
        (ramp.limit(), ramp.history())
    }

    #[test]
    fn grows_to_the_cap_while_each_request_adds_its_own_rate() {
        let (limit, history) = run(16, |n| 40e6 * n as f64);
        assert_eq!(limit, 16, "{history}");
        assert_eq!(
            history.split(',').map(|h| h.split('@').next().unwrap()).collect::<Vec<_>>(),
            ["1", "2", "4", "8", "16"]
        );
    }

    #[test]
    fn stays_at_one_when_the_total_is_the_limit() {
        let (limit, history) = run(16, |_| 40e6);
        assert_eq!(limit, 1, "{history}");
    }

    #[test]
    fn goes_back_to_the_last_doubling_that_paid() {
        // Four and a half requests' worth of total capacity: 4 paid over 2, 8 does not pay over 4 (1.125×).
        let (limit, history) = run(16, |n| 40e6 * (n as f64).min(4.5));
        assert_eq!(limit, 4, "{history}");
    }

    #[test]
    fn waits_for_every_request_to_be_under_way_and_stops_when_chunks_run_out() {
        let start = Instant::now();
        let mut ramp = Ramp::new(16, start);
        let at = |ms| start + Duration::from_millis(ms);
        ramp.observe(at(10), 0, false, true, MIN_WINDOW);
        ramp.observe(at(500), 1 << 30, false, true, MIN_WINDOW);
        assert_eq!(ramp.limit(), 1, "measured before the request was under way");
        ramp.observe(at(600), 1 << 30, true, true, MIN_WINDOW);
        ramp.observe(at(800), 2 << 30, true, true, MIN_WINDOW);
        assert_eq!(ramp.limit(), 2);
        ramp.observe(at(900), 3 << 30, true, false, MIN_WINDOW);
        ramp.observe(at(2000), 9 << 30, true, true, MIN_WINDOW);
        assert_eq!(ramp.limit(), 2, "changed after the chunks ran out");
        assert_eq!(Ramp::new(1, start).history(), "1@0");
    }
}
