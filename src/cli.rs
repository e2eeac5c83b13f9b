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
        }
    }
}
