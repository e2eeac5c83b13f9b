//! Membership: the peers from a static list, a file and a headless Service's DNS name, refreshed in the
//! background. No protocol of its own: Kubernetes decides who is ready, and a stale view is corrected by
//! passive health (see [`super::Cluster::suspect`]).

use crate::config::ClusterSettings;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the peers come from; each source keeps its last good answer when a refresh fails, so a DNS
/// outage or a half-written file does not empty the view.
pub(super) struct Sources {
    fixed: Vec<String>,
    file: Option<PathBuf>,
    dns: Option<(String, u16, Option<TokioResolver>)>,
    last_file: Vec<String>,
    last_dns: Vec<String>,
}

impl Sources {
    pub(super) fn new(s: &ClusterSettings) -> Sources {
        let dns = s.peers_dns.rsplit_once(':').and_then(|(name, port)| {
            let port = port.parse().ok()?;
            let resolver = s.dns_server.parse::<SocketAddr>().ok().map(|server| {
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for c in &mut ns.connections {
                    c.port = server.port();
                }
                let mut b = TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                );
                // Every refresh asks the server: the records are the membership, and the server's TTL is short.
                b.options_mut().cache_size = 0;
                b.options_mut().timeout = std::time::Duration::from_secs(2);
                b.options_mut().attempts = 1;
                b.build()
            });
            let resolver = match resolver {
                Some(Ok(r)) => Some(r),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "building the peer DNS resolver; using the system resolver");
                    None
                }
                None => None,
            };
            Some((name.to_owned(), port, resolver))
        });
        Sources { fixed: s.peers.clone(), file: s.peers_file.clone(), dns, last_file: Vec::new(), last_dns: Vec::new() }
    }

    /// The current peers, sorted and without duplicates.
    pub(super) async fn refresh(&mut self) -> Vec<String> {
        let mut all = Vec::new();
        for entry in &self.fixed {
            all.extend(resolve_entry(entry).await);
        }
        if let Some(path) = self.file.clone() {
            match tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await {
                Ok(Ok(text)) => {
                    let mut peers = Vec::new();
                    for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty())
                    {
                        peers.extend(resolve_entry(line).await);
                    }
                    self.last_file = peers;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "reading the peers file; keeping its last peers"),
                Err(e) => tracing::warn!(error = %e, "reading the peers file"),
            }
            all.extend(self.last_file.iter().cloned());
        }
        if let Some((name, port, resolver)) = &self.dns {
            let found: Result<Vec<String>, String> = match resolver {
                Some(r) => r
                    .lookup_ip(name.as_str())
                    .await
                    .map(|ips| ips.iter().map(|ip| SocketAddr::new(ip, *port).to_string()).collect())
                    .map_err(|e| e.to_string()),
                None => tokio::net::lookup_host((name.as_str(), *port))
                    .await
                    .map(|addrs| addrs.map(|a| a.to_string()).collect())
                    .map_err(|e| e.to_string()),
            };
            match found {
                Ok(peers) => self.last_dns = peers,
                Err(e) => tracing::warn!(name, error = %e, "resolving the peers' DNS name; keeping the last answer"),
            }
            all.extend(self.last_dns.iter().cloned());
        }
        all.sort();
        all.dedup();
        all
    }
}

/// An entry as peer ids: an address as is (normalised), a `host:port` name resolved to its addresses.
async fn resolve_entry(entry: &str) -> Vec<String> {
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return vec![addr.to_string()];
    }
    match tokio::net::lookup_host(entry).await {
        Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
        Err(e) => {
            tracing::warn!(peer = entry, error = %e, "a listed peer does not resolve");
            Vec::new()
        }
    }
}
