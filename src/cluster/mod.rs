//! The cluster tier: wharf instances on several nodes fetch each blob from the upstream once per cluster.
//!
//! Membership comes from outside (a static list, a file, a headless Service's DNS name; see `members`);
//! ownership is rendezvous hashing of a key over the current view ([`hrw`]); peers talk over signed HTTP
//! ([`auth`], [`PeerClient`]). This room knows who to ask; the cache decides when to ask, and feeds a peer's
//! bytes into the same fill (temporary file, hash, verify, commit) as an upstream's.
//!
//! A request from a peer is never forwarded to another peer: the node receiving it serves it or asks the
//! upstream itself. So views that disagree cost at most an extra upstream fetch, never a loop or a node
//! waiting on itself.

pub mod auth;
mod client;
pub mod hrw;
mod members;

pub use client::{FillStatus, OUTCOME_HEADER, PeerClient, PeerError, PeerManifest};

use crate::config::ClusterSettings;
use crate::metrics::Metrics;
use auth::Keys;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Peers asked for one key before the upstream: the owner and one fallback.
const MAX_PEER_SOURCES: usize = 2;

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The key file is missing or weak.
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    /// An address in the settings is not usable.
    #[error("cluster.{0}: {1}")]
    Address(&'static str, String),
    /// The HTTP client could not be built.
    #[error("building the peer client")]
    Client(#[source] reqwest::Error),
}

/// Cheap-clone handle: this node's id, the current view, passive health and the peer client.
#[derive(Clone, Debug)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    me: String,
    view: RwLock<Arc<Vec<String>>>,
    /// Peer → until when it is skipped.
    suspects: Mutex<HashMap<String, Instant>>,
    keys: Arc<RwLock<Keys>>,
    key_file: PathBuf,
    client: PeerClient,
    settings: ClusterSettings,
    metrics: Arc<Metrics>,
    /// Whether the peer API listener is up (readiness covers it: a node whose peers cannot reach it must
    /// leave the others' views).
    listening: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// The cluster of a configuration, or `None` when it is off. Reads the key file (blocking).
    pub fn from_settings(s: &ClusterSettings, metrics: Arc<Metrics>) -> Result<Option<Cluster>, SetupError> {
        if !s.enabled() {
            return Ok(None);
        }
        let listen: SocketAddr =
            s.peer_listen.parse().map_err(|_| SetupError::Address("peer_listen", s.peer_listen.clone()))?;
        let me: SocketAddr = if s.self_addr.is_empty() {
            listen
        } else {
            s.self_addr.parse().map_err(|_| SetupError::Address("self", s.self_addr.clone()))?
        };
        let key_file = s.key_file.clone().ok_or(SetupError::Address("key_file", "missing".into()))?;
        let keys = Arc::new(RwLock::new(Keys::load(&key_file)?));
        // Outgoing peer connections leave from this node's peer address: on loopback every address would
        // otherwise leave as 127.0.0.1, and on a multi-homed node from whichever interface routes first.
        let bind = (!listen.ip().is_unspecified()).then_some(listen.ip());
        let connect = Duration::from_millis(s.connect_timeout_ms);
        let client = PeerClient::new(me.to_string(), bind, keys.clone(), connect).map_err(SetupError::Client)?;
        let inner = Inner {
            me: me.to_string(),
            view: RwLock::default(),
            suspects: Mutex::default(),
            keys,
            key_file,
            client,
            settings: s.clone(),
            metrics,
            listening: std::sync::atomic::AtomicBool::new(false),
        };
        Ok(Some(Cluster { inner: Arc::new(inner) }))
    }

    /// This node's id: its peer address as the others see it.
    pub fn id(&self) -> &str {
        &self.inner.me
    }

    /// Records whether the peer API listener is serving.
    pub fn set_listening(&self, up: bool) {
        self.inner.listening.store(up, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the peer API listener is serving.
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The peer client.
    pub fn client(&self) -> &PeerClient {
        &self.inner.client
    }

    /// Seconds without a byte from a peer before its fill is checked.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.inner.settings.stall_timeout.max(1))
    }

    /// The current view (sorted).
    pub fn view(&self) -> Arc<Vec<String>> {
        self.inner.view.read().unwrap().clone()
    }

    /// Replaces the view (the membership loop; tests).
    pub fn set_view(&self, peers: Vec<String>) {
        let peers = Arc::new(peers);
        let changed = {
            let mut view = self.inner.view.write().unwrap();
            let changed = **view != *peers;
            *view = peers.clone();
            changed
        };
        if changed {
            self.inner.metrics.owner_changes.inc();
            self.inner.metrics.peers_ready.set(peers.len() as i64);
            tracing::info!(peers = ?peers, "peer view changed");
        }
    }

    /// The peers to ask for `key`, best first: those ranked above this node, skipping suspects, at most
    /// two (the owner and one fallback). Empty when this node owns the key (or every better peer is suspect): fill from
    /// the upstream. This node always counts as a member of its own view.
    pub fn sources(&self, key: &str) -> Vec<String> {
        let view = self.view();
        let now = Instant::now();
        let mut suspects = self.inner.suspects.lock().unwrap();
        suspects.retain(|_, until| *until > now);
        let me = self.inner.me.as_str();
        let ranked = hrw::rank(view.iter().map(String::as_str).chain(std::iter::once(me)), key);
        ranked
            .into_iter()
            .take_while(|p| *p != me)
            .filter(|p| !suspects.contains_key(*p))
            .take(MAX_PEER_SOURCES)
            .map(str::to_owned)
            .collect()
    }

    /// Skips `peer` for `suspect_for` seconds: it refused, timed out, stalled or sent wrong bytes. A stale
    /// view then costs one failed attempt, not one per request.
    pub fn suspect(&self, peer: &str, why: &str) {
        let until = Instant::now() + Duration::from_secs(self.inner.settings.suspect_for);
        self.inner.suspects.lock().unwrap().insert(peer.to_owned(), until);
        tracing::warn!(peer, why, "peer skipped for {}s", self.inner.settings.suspect_for);
    }

    /// Checks a peer request's signature (see [`auth::Keys::verify`]).
    pub fn verify(
        &self,
        method: &str,
        target: &str,
        sender: Option<&str>,
        header: Option<&str>,
    ) -> Result<(), auth::Refused> {
        self.inner.keys.read().unwrap().verify(method, target, sender, header, auth::now())
    }

    /// Counts peer bytes.
    pub fn count_bytes(&self, direction: &'static str, n: u64) {
        self.inner.metrics.peer_bytes.get_or_create(&crate::metrics::DirectionLabel { direction }).inc_by(n);
    }

    /// Counts a fallback from a peer to the next source.
    pub fn count_fallback(&self, reason: &'static str) {
        self.inner.metrics.peer_fallbacks.get_or_create(&crate::metrics::ReasonLabel { reason }).inc();
    }

    /// Counts a blob whose peer bytes failed verification.
    pub fn count_corrupt(&self) {
        self.inner.metrics.peer_corrupt.inc();
    }

    /// Keeps the view current (and the keys, which a Secret update rotates) until `stop`. The first refresh
    /// runs before this returns, so the node starts with a view.
    pub async fn spawn_membership(&self, stop: CancellationToken) {
        let mut sources = members::Sources::new(&self.inner.settings);
        self.set_view(sources.refresh().await);
        let this = self.clone();
        let every = Duration::from_secs(self.inner.settings.dns_interval.max(1));
        tokio::spawn(async move {
            let read = |path: PathBuf| async move {
                tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await.ok().and_then(Result::ok)
            };
            let mut keys_text = read(this.inner.key_file.clone()).await;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => return,
                }
                this.set_view(sources.refresh().await);
                let text = read(this.inner.key_file.clone()).await;
                if let Some(new) = text.as_deref().filter(|_| text != keys_text) {
                    match Keys::parse_file(new, &this.inner.key_file) {
                        Ok(keys) => {
                            *this.inner.keys.write().unwrap() = keys;
                            tracing::info!("peer keys reloaded");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "peer key file changed but is not usable; keeping the old keys")
                        }
                    }
                    keys_text = text;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(me: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("keys");
        std::fs::write(&key, "k".repeat(40)).unwrap();
        let s = ClusterSettings {
            peer_listen: me.into(),
            peers: vec![me.into()],
            key_file: Some(key),
            ..ClusterSettings::default()
        };
        Cluster::from_settings(&s, Arc::default()).unwrap().unwrap()
    }

    #[test]
    fn sources_are_the_peers_ranked_above_this_node_without_suspects() {
        let peers: Vec<String> = ["127.0.0.2:1", "127.0.0.3:1", "127.0.0.4:1"].map(String::from).to_vec();
        let c = cluster("127.0.0.2:1");
        c.set_view(peers.clone());
        let (mut mine, mut theirs) = (0, 0);
        for k in 0..300 {
            let key = format!("sha256:{k}");
            let ranked = hrw::rank(peers.iter().map(String::as_str), &key);
            let sources = c.sources(&key);
            let above: Vec<&str> = ranked.iter().copied().take_while(|p| *p != "127.0.0.2:1").collect();
            assert_eq!(sources, above, "{key}");
            if sources.is_empty() { mine += 1 } else { theirs += 1 }
        }
        assert!(mine > 50 && theirs > 150, "mine {mine}, theirs {theirs}");
        // A suspect is skipped while it is suspect.
        let key = (0..).map(|k| format!("sha256:{k}")).find(|k| c.sources(k).len() == 2).unwrap();
        let owner = c.sources(&key)[0].clone();
        c.suspect(&owner, "test");
        assert_eq!(c.sources(&key).len(), 1);
        assert_ne!(c.sources(&key)[0], owner);
    }

    #[test]
    fn a_node_missing_from_its_own_view_still_counts_itself() {
        let c = cluster("127.0.0.9:1");
        c.set_view(vec!["127.0.0.2:1".into()]);
        let owned = (0..200).filter(|k| c.sources(&format!("k{k}")).is_empty()).count();
        assert!((50..150).contains(&owned), "{owned} of 200 keys owned by this node");
    }
}
