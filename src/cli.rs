//! Command line: `wharf serve` and its stable flags (scripts and docs use them).

use crate::config::{LogFormat, Overrides, parse_upstream_flag};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A pull-through caching OCI registry mirror.
#[derive(Debug, Parser)]
#[command(name = "wharf", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry API (defaults: listen on 0.0.0.0:5000, data in ./wharf-data; no config file needed).
    Serve(ServeArgs),
    /// Print the effective configuration as TOML (credentials redacted) and exit.
    Config(ServeArgs),
    /// Point this node's containerd at wharf (certs.d hosts.toml with fallback); `--remove` undoes it.
    NodeSetup(crate::node_setup::Args),
    /// Pull images into the cache now: through a running wharf (`--server`) or into a data directory.
    Prefetch(PrefetchArgs),
}

/// Flags for `serve`. Each overrides the config file and `WHARF_…` environment variables.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (see config/wharf.toml for every key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Cache directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve registry name REGISTRY from endpoint URL, e.g. `docker.io=https://registry-1.docker.io`
    /// (repeatable; http:// allowed for air-gapped mirrors and tests).
    #[arg(long = "upstream", value_name = "REGISTRY=URL", value_parser = parse_upstream_flag)]
    pub upstreams: Vec<(String, String)>,
    /// Registry used when the request names none (Docker's `registry-mirrors`).
    #[arg(long, value_name = "REGISTRY")]
    pub default_registry: Option<String>,
    /// Seconds a tag is served from cache before revalidation.
    #[arg(long, value_name = "SECONDS")]
    pub tag_ttl: Option<u64>,
    /// Upstream credentials as a docker config.json (a `dockerconfigjson` Secret).
    #[arg(long = "credentials", value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Shorthand for `--log-format json`.
    #[arg(long, conflicts_with = "log_format")]
    pub json: bool,
    /// Serve the peer API here and join the cluster (`cluster.peer_listen`).
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// Static peer list, `HOST:PORT,...` (may include this node).
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// File with one peer `host:port` a line, re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub peers_file: Option<PathBuf>,
    /// Headless Service `name:port` whose records are the peers.
    #[arg(long, value_name = "NAME:PORT")]
    pub peers_dns: Option<String>,
    /// Nameserver for `--peers-dns` instead of the system resolver.
    #[arg(long, value_name = "IP:PORT")]
    pub peer_dns_server: Option<String>,
    /// The shared peer keys, one a line (the first signs).
    #[arg(long, value_name = "FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// This node's peer address as the others see it (when `--peer-listen` is a wildcard).
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_self: Option<String>,
}

impl ServeArgs {
    /// The flags as configuration overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            default_registry: self.default_registry.clone(),
            tag_ttl: self.tag_ttl,
            credentials_file: self.credentials.clone(),
            log_format: if self.json { Some(LogFormat::Json) } else { self.log_format },
            upstreams: self.upstreams.clone(),
            cluster: crate::config::ClusterOverrides {
                peer_listen: self.peer_listen.clone(),
                peers: self.peers.clone(),
                peers_file: self.peers_file.clone(),
                peers_dns: self.peers_dns.clone(),
                dns_server: self.peer_dns_server.clone(),
                key_file: self.peer_key_file.clone(),
                self_addr: self.peer_self.clone(),
            },
        }
    }
}

/// Flags for `prefetch`: where to pull into, and (for `--data-dir`) the usual configuration layers.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("into").required(true).args(["server", "data_dir"])))]
pub struct PrefetchArgs {
    /// Images, `[registry/]name[:tag|@digest]`, e.g. `docker.io/library/nginx:1.27`.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
    /// Platform to keep from a multi-platform image, `os/arch[/variant]` (repeatable; default: this node's).
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// Pull through the running wharf at URL (e.g. `http://127.0.0.1:5000`), which caches what passes.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Fill this cache directory directly (no wharf may be running on it).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML config file, for registries and credentials (with `--data-dir`).
    #[arg(long, value_name = "FILE", conflicts_with = "server")]
    pub config: Option<PathBuf>,
    /// Serve registry name REGISTRY from endpoint URL (repeatable; with `--data-dir`).
    #[arg(long = "upstream", value_name = "REGISTRY=URL", value_parser = parse_upstream_flag, conflicts_with = "server")]
    pub upstreams: Vec<(String, String)>,
    /// Registry for images that name none (with `--data-dir`).
    #[arg(long, value_name = "REGISTRY", conflicts_with = "server")]
    pub default_registry: Option<String>,
    /// Upstream credentials as a docker config.json (with `--data-dir`).
    #[arg(long = "credentials", value_name = "FILE", conflicts_with = "server")]
    pub credentials: Option<PathBuf>,
    /// JSON log lines (and no progress bars).
    #[arg(long)]
    pub json: bool,
}

impl PrefetchArgs {
    /// The flags as configuration overrides (for `--data-dir`).
    pub fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            default_registry: self.default_registry.clone(),
            credentials_file: self.credentials.clone(),
            upstreams: self.upstreams.clone(),
            ..Overrides::default()
        }
    }
}
