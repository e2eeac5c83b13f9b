//! Single flight: concurrent callers that need the same upstream answer share one request.
//!
//! The work runs on a task of its own, so a caller that gives up (its request deadline fired, its client
//! left) never cancels it for the others, whichever of them started it; every caller still waiting gets a
//! copy of the one answer, error included. Answers are not kept: the caller's own cache does that. The work has
//! a time limit of its own: an upstream that trickles bytes under the read timeout must not hold the key, and
//! so every later request for it, for longer than a request may wait.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long shared work (a manifest, a token) may run: twice the request deadline, so that a request joining
/// it late still gets its own deadline's worth, while stuck work frees its key for new attempts.
pub fn limit(config: &crate::config::Config) -> Duration {
    Duration::from_secs(config.server.request_timeout.max(1).saturating_mul(2))
}

/// Work under way, by key. `T` is the whole answer, errors included (share errors as `Arc`s).
pub struct Flights<T> {
    // std Mutex: held only to look up, insert or remove a key, never across an await.
    running: Arc<Mutex<HashMap<String, watch::Receiver<Option<T>>>>>,
    joined: Counter,
    limit: Duration,
}

/// The shared work ended without an answer: it panicked, outlived its time limit, or the runtime is shutting
/// down.
#[derive(Debug, thiserror::Error)]
#[error("a shared upstream request ended without an answer")]
pub struct Lost;

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// An empty map; `joined` counts the callers that joined work already under way; work still running after
    /// `limit` is dropped and its callers get [`Lost`].
    pub fn new(joined: Counter, limit: Duration) -> Self {
        Flights { running: Arc::default(), joined, limit }
    }

    /// The answer of the work for `key`: `work()` is spawned when nothing is under way for `key`, and not
    /// called at all otherwise. Also says whether this caller joined work another caller started.
    pub async fn run<F>(&self, key: &str, work: impl FnOnce() -> F) -> Result<(T, bool), Lost>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let (mut answer, start) = {
            let mut running = self.running.lock().unwrap();
            match running.get(key) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    running.insert(key.to_owned(), rx.clone());
                    (rx, Some(tx))
                }
            }
        };
        let joined = start.is_none();
        if let Some(tx) = start {
            // Removes the key however the work ends, a panic included (waiters then see `Lost`).
            let done = Done { running: self.running.clone(), key: key.to_owned() };
            let work = work();
            let limit = self.limit;
            tokio::spawn(async move {
                match tokio::time::timeout(limit, work).await {
                    Ok(value) => {
                        // Sent before the key goes: a caller arriving in between gets this answer, not new work.
                        tx.send_replace(Some(value));
                        drop(done);
                    }
                    Err(_) => {
                        tracing::warn!(key = %done.key, ?limit, "a shared upstream request ran out of time; dropped");
                        // The key goes first: callers woken by the dropped sender and asking again start anew.
                        drop(done);
                        drop(tx);
                    }
                }
            });
        }
        if joined {
            self.joined.inc();
        }
        let value = answer.wait_for(Option::is_some).await.map_err(|_| Lost)?;
        Ok((value.clone().expect("waited for an answer"), joined))
    }

    /// Keys with work under way.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap().len()
    }

    /// Whether nothing is under way.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let running = self.running.lock().map(|r| r.len()).unwrap_or(0);
        f.debug_struct("Flights").field("running", &running).finish()
    }
}

struct Done<T> {
    running: Arc<Mutex<HashMap<String, watch::Receiver<Option<T>>>>>,
    key: String,
}

impl<T> Drop for Done<T> {
    fn drop(&mut self) {
        // Poison-tolerant: this also runs while a panicking task unwinds.
        self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::sync::Notify;

    type Answer = Result<u32, Arc<String>>;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Flights<Answer>> = Arc::new(Flights::new(Counter::default(), Duration::from_secs(60)));
        let runs = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(Notify::new());
        let mut callers = Vec::new();
        for _ in 0..16 {
            let (flights, runs, go) = (flights.clone(), runs.clone(), go.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run("k", || async move {
                        runs.fetch_add(1, SeqCst);
                        go.notified().await;
                        Ok(7)
                    })
                    .await
            }));
        }
        while flights.joined.get() < 15 {
            tokio::task::yield_now().await;
        }
        go.notify_one();
        let mut joined = 0;
        for c in callers {
            let (answer, j) = c.await.unwrap().unwrap();
            assert_eq!(answer, Ok(7));
            joined += usize::from(j);
        }
        assert_eq!((runs.load(SeqCst), joined), (1, 15));
        assert!(flights.is_empty(), "the key outlived its work");
        // Answers are not kept: the next call runs the work again.
        let (answer, j) = flights.run("k", || async { Err(Arc::new("no".to_owned())) }).await.unwrap();
        assert_eq!((answer, j), (Err(Arc::new("no".to_owned())), false));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_cancels_nothing_for_the_others() {
        let flights: Arc<Flights<Answer>> = Arc::new(Flights::new(Counter::default(), Duration::from_secs(60)));
        let go = Arc::new(Notify::new());
        let leader = {
            let (flights, go) = (flights.clone(), go.clone());
            tokio::spawn(async move {
                flights
                    .run("k", || async move {
                        go.notified().await;
                        Ok(1)
                    })
                    .await
            })
        };
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run("k", || async { Ok(2) }).await })
        };
        while flights.joined.get() < 1 {
            tokio::task::yield_now().await;
        }
        // The caller that started the work leaves (as a request whose deadline fired does).
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        go.notify_one();
        let answer = tokio::time::timeout(Duration::from_secs(10), follower).await.expect("the follower stalled");
        assert_eq!(answer.unwrap().unwrap(), (Ok(1), true));
    }

    #[tokio::test]
    async fn work_past_its_time_limit_fails_its_callers_and_frees_the_key() {
        let flights: Flights<Answer> = Flights::new(Counter::default(), Duration::from_millis(200));
        // Bounds the test only: without the limit, the caller would wait forever.
        let stuck = tokio::time::timeout(Duration::from_secs(30), flights.run("k", std::future::pending)).await;
        assert!(matches!(stuck, Ok(Err(Lost))), "the stuck work was not dropped at its limit");
        assert!(flights.is_empty());
        let again = flights.run("k", || async { Ok(7) }).await;
        assert!(matches!(again, Ok((Ok(7), false))), "a later caller must start new work");
    }

    #[tokio::test]
    async fn a_panicking_run_fails_its_callers_and_frees_the_key() {
        let flights: Flights<Answer> = Flights::new(Counter::default(), Duration::from_secs(60));
        let r = flights.run("k", || async { panic!("boom") }).await;
        assert!(matches!(r, Err(Lost)));
        assert!(flights.is_empty());
        assert_eq!(flights.run("k", || async { Ok(3) }).await.unwrap(), (Ok(3), false));
    }
}
