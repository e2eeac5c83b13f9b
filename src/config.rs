//! Configuration: embedded defaults < `--config` TOML < `WHARF_…` environment < command-line flags.
//! Built once at start-up into a validated [`Config`]; nothing else reads files or the environment for settings.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why the configuration could not be built; names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value failed to parse or a key is unknown.
    #[error("configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A value parsed but is not usable.
    #[error("configuration key `{key}`: {reason}")]
    Value {
        /// Dotted key path.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Every setting wharf has. `config/wharf.toml` documents each key; a test checks it matches `Default`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on for registry clients.
    pub listen: SocketAddr,
    /// Where blobs, manifests and metadata live.
    pub data_dir: PathBuf,
    /// Registry used when a request names none (what Docker's `registry-mirrors` sends).
    pub default_registry: String,
    /// Seconds a tag is answered from cache before a HEAD revalidates it upstream.
    pub tag_ttl: u64,
    /// `text` (human) or `json` log lines.
    pub log_format: LogFormat,
    /// Upstream credentials as a docker `config.json` (the Kubernetes `dockerconfigjson` format).
    pub credentials_file: Option<PathBuf>,
    /// Seconds in-flight responses get to finish after SIGTERM.
    pub shutdown_grace: u64,
    /// How wharf talks to upstreams.
    pub upstream: UpstreamSettings,
    /// Disk bounds and eviction.
    pub cache: CacheSettings,
    /// Images kept pulled and pinned.
    pub warm: WarmSettings,
    /// The admin API listener (off by default).
    pub admin: AdminSettings,
    /// Who may read private content (see SECURITY.md).
    pub access: AccessSettings,
    /// Limits and timeouts of the registry listener, and optional TLS.
    pub server: ServerSettings,
    /// Cooperation with the wharf instances on other nodes (off unless `peer_listen` is set).
    pub cluster: ClusterSettings,
    /// A shared object-storage tier below the node's disk (off unless `[storage.s3]` is set).
    pub storage: StorageSettings,
    /// Registries wharf mirrors, keyed by the name clients use (`docker.io`, `ghcr.io`, `myreg:5000`).
    pub registries: BTreeMap<String, RegistryConfig>,
}

/// Output format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings shared by all upstream connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// Seconds to establish a TCP/TLS connection.
    pub connect_timeout: u64,
    /// Seconds without any bytes from the upstream before a request fails (a stalled read).
    pub read_timeout: u64,
    /// Extra PEM CA files trusted in addition to the platform roots.
    pub ca_files: Vec<PathBuf>,
    /// Redirects followed per request.
    pub max_redirects: usize,
    /// Bytes per upstream range request when a large blob is fetched in parallel.
    pub fill_chunk_size: u64,
    /// Most range requests in flight per blob, ramped up from one while more pay (1: every blob as one stream).
    pub fill_concurrency: usize,
}

/// Disk bounds, after the kubelet's image GC (`imageGCHighThresholdPercent` and friends).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Byte budget for cached blobs; 0 means no byte budget (watermarks only).
    pub max_bytes: u64,
    /// Start evicting when the cache filesystem is fuller than this percentage.
    pub high_watermark: u8,
    /// Evict until the cache filesystem is at most this full (and the cache within `max_bytes`).
    pub low_watermark: u8,
    /// Seconds a blob is kept after its last use even under pressure (`imageMinimumGCAge`).
    pub min_age: u64,
    /// Evict blobs unused for this many seconds regardless of pressure; 0 disables (`imageMaximumGCAge`).
    pub max_idle_age: u64,
    /// Seconds between background eviction passes.
    pub gc_interval: u64,
    /// Free bytes fills leave on the cache's filesystem for the metadata database (and the rest of the
    /// system): a fill stops writing, and its clients continue from the upstream, below this. Capped at a
    /// tenth of the filesystem's size, so a small filesystem is not all reserve.
    pub min_free_bytes: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_bytes: 0,
            high_watermark: 85,
            low_watermark: 80,
            min_age: 120,
            max_idle_age: 0,
            gc_interval: 60,
            min_free_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Images to keep pulled and pinned against eviction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmSettings {
    /// Seconds between re-resolving the warm list (tags move).
    pub interval: u64,
    /// The images.
    pub images: Vec<WarmImage>,
    /// The node's container runtime (`unix:///run/containerd/containerd.sock`), for images marked
    /// `into_runtime`; empty: wharf never talks to the runtime.
    pub runtime_endpoint: String,
    /// Seconds each runtime call other than a pull may take.
    pub runtime_timeout: u64,
    /// Seconds a runtime pull may take (the image is already in wharf: this bounds unpacking).
    pub runtime_pull_timeout: u64,
}

impl Default for WarmSettings {
    fn default() -> Self {
        WarmSettings {
            interval: 600,
            images: Vec::new(),
            runtime_endpoint: String::new(),
            runtime_timeout: 10,
            runtime_pull_timeout: 900,
        }
    }
}

/// One warm image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmImage {
    /// `registry/name:tag` or `registry/name@sha256:…` (`docker.io/library/nginx:1.27`).
    pub image: String,
    /// `os/arch[/variant]` to keep from an index; empty means the node's own platform.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Also pull the image into the node's runtime (`warm.runtime_endpoint`) once wharf has it.
    #[serde(default)]
    pub into_runtime: bool,
    /// Label the runtime's image so the kubelet's image GC keeps it (needs `into_runtime`).
    #[serde(default)]
    pub pin_in_runtime: bool,
}

/// The admin API: a separate listener, off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener, e.g. `127.0.0.1:5001`; empty disables it.
    pub listen: String,
    /// Bearer token required on every admin request; empty means none.
    pub token: String,
}

/// Access to private content: what wharf could fetch only with its configured credentials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    /// What a client without access to private content gets: `deny` (401 with a challenge) or `hide` (404).
    pub private_answer: PrivateAnswer,
    /// Seconds a verdict on a client's own upstream credentials is reused (memory only, never on disk).
    pub credential_ttl: u64,
    /// Seconds a learnt repository visibility (public or private) is trusted before it is probed again.
    pub visibility_ttl: u64,
    /// Client tokens and what each may read.
    pub tokens: Vec<ClientToken>,
}

impl Default for AccessSettings {
    fn default() -> Self {
        AccessSettings {
            private_answer: PrivateAnswer::Deny,
            credential_ttl: 60,
            visibility_ttl: 600,
            tokens: Vec::new(),
        }
    }
}

/// The answer to a client that may not read private content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivateAnswer {
    /// 401 `UNAUTHORIZED` with `WWW-Authenticate: Basic realm="wharf"`, so clients offer credentials.
    Deny,
    /// 404, as if wharf had never heard of it: does not reveal that a private repository exists.
    Hide,
}

/// A client token: sent as `Authorization: Bearer <token>` (containerd `hosts.toml` header) or as the
/// password of Basic credentials (Docker, podman).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToken {
    /// A name for logs.
    pub name: String,
    /// The secret.
    pub token: String,
    /// `registry/repository` patterns this token may read: `*` within one path component, `**` across them
    /// (`ghcr.io/acme/*`, `registry.example:5000/**`).
    pub read: Vec<String>,
}

impl fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientToken")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("read", &self.read)
            .finish()
    }
}

/// What the registry listener accepts: limits against slow or greedy clients, and TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Seconds from a request head's first byte to its end (slow-loris); a new connection's first head (and its
    /// TLS handshake) is timed from the accept.
    pub header_timeout: u64,
    /// Seconds an idle keep-alive connection stays open.
    pub idle_timeout: u64,
    /// Largest request head in bytes (request line and headers).
    pub max_header_bytes: usize,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Upstream fills running at once; more wait their turn (queued, not failed).
    pub max_fills: usize,
    /// Seconds a request may wait for the upstream before the client gets an error (503), whatever the
    /// upstream does. Bodies that have started are bounded by `upstream.read_timeout` per stall instead.
    pub request_timeout: u64,
    /// PEM certificate chain: serve HTTPS (HTTP/1.1 and HTTP/2). Reloaded when the file changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            header_timeout: 10,
            idle_timeout: 90,
            max_header_bytes: 64 * 1024,
            max_connections: 4096,
            max_fills: 64,
            request_timeout: 120,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The cluster tier: instances on several nodes fetch each blob from the upstream once per cluster and stream
/// it to each other. Off (a single node) while `peer_listen` is empty.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// Address of the peer API, a listener of its own (never the client API), e.g. `10.0.0.5:5001`.
    pub peer_listen: String,
    /// This node's peer address as the others see it; defaults to `peer_listen` (needed when that is a
    /// wildcard address).
    #[serde(rename = "self")]
    pub self_addr: String,
    /// A static list of peers (`host:port`), which may include this node.
    pub peers: Vec<String>,
    /// A file with one `host:port` a line (`#` starts a comment), re-read when it changes.
    pub peers_file: Option<PathBuf>,
    /// `name:port` of a headless Service: every A/AAAA record is a peer, re-resolved every `dns_interval`.
    pub peers_dns: String,
    /// Nameserver (`ip:port`) to resolve `peers_dns` at, instead of the system resolver.
    pub dns_server: String,
    /// Seconds between two resolutions of `peers_dns` (and checks of `peers_file`).
    pub dns_interval: u64,
    /// The shared peer keys, one a line, each 32 or more printable characters: the first signs, every one
    /// verifies (two at once while a key is rotated).
    pub key_file: Option<PathBuf>,
    /// Milliseconds to connect to a peer before trying the next one.
    pub connect_timeout_ms: u64,
    /// Seconds without a byte from a peer before its fill is checked, and the transfer resumed elsewhere
    /// unless the peer is itself waiting for the upstream.
    pub stall_timeout: u64,
    /// Seconds a peer that refused, timed out or sent wrong bytes is skipped.
    pub suspect_for: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            peer_listen: String::new(),
            self_addr: String::new(),
            peers: Vec::new(),
            peers_file: None,
            peers_dns: String::new(),
            dns_server: String::new(),
            dns_interval: 5,
            key_file: None,
            connect_timeout_ms: 500,
            stall_timeout: 10,
            suspect_for: 30,
        }
    }
}

impl fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("peer_listen", &self.peer_listen)
            .field("self", &self.self_addr)
            .field("peers", &self.peers)
            .field("peers_file", &self.peers_file)
            .field("peers_dns", &self.peers_dns)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ClusterSettings {
    /// Whether the cluster tier is on.
    pub fn enabled(&self) -> bool {
        !self.peer_listen.is_empty()
    }
}

/// Storage tiers beside the node's disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// An S3-compatible bucket shared by every node.
    pub s3: Option<S3Settings>,
}

/// An S3-compatible bucket: blobs by digest, immutable, shared by every node (and cluster) that uses it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// The bucket's name.
    pub bucket: String,
    /// Key prefix inside the bucket (objects are `<prefix>/blobs/sha256/<hex>`).
    #[serde(default)]
    pub prefix: String,
    /// Endpoint of an S3-compatible server; empty: AWS.
    #[serde(default)]
    pub endpoint: String,
    /// Region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key; unset: the standard AWS chain (environment, web identity / IRSA, instance profile).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret for `access_key_id`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Allows a plain-HTTP endpoint (tests).
    #[serde(default)]
    pub allow_http: bool,
    /// Seconds a failing bucket is skipped before it is tried again.
    #[serde(default = "default_breaker")]
    pub breaker_seconds: u64,
    /// Seconds an upload part (or the upload's completion) may take before the upload is abandoned.
    #[serde(default = "default_part_timeout")]
    pub part_timeout_seconds: u64,
}

fn default_part_timeout() -> u64 {
    60
}

fn default_breaker() -> u64 {
    60
}

fn default_region() -> String {
    "us-east-1".into()
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("allow_http", &self.allow_http)
            .field("breaker_seconds", &self.breaker_seconds)
            .field("part_timeout_seconds", &self.part_timeout_seconds)
            .finish()
    }
}

/// Whether a registry's content may be private.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Learn per repository: content wharf can fetch anonymously is public, the rest private. Only
    /// registries with credentials have private content.
    #[default]
    Auto,
    /// Everything is public (skip the probes).
    Public,
    /// Everything is private, even what the upstream serves anonymously.
    Private,
}

/// One upstream registry.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Endpoint, e.g. `https://registry-1.docker.io`. `http://` needs `insecure = true`.
    pub url: String,
    /// Allows plain HTTP (tests, air-gapped mirrors).
    #[serde(default)]
    pub insecure: bool,
    /// Username for token or Basic auth.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(default)]
    pub password: Option<String>,
    /// A registry token used as the Basic password or identity token.
    #[serde(default)]
    pub token: Option<String>,
    /// Whether content may be private (`auto`, `public`, `private`).
    #[serde(default)]
    pub visibility: Visibility,
}

impl fmt::Debug for RegistryConfig {
    // Secrets never reach logs, so they are redacted here rather than at every call site.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("url", &self.url)
            .field("insecure", &self.insecure)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("visibility", &self.visibility)
            .finish()
    }
}

impl RegistryConfig {
    /// A registry at `url` without credentials; plain HTTP allowed when the URL says so.
    pub fn at(url: &str) -> Self {
        RegistryConfig {
            url: url.to_owned(),
            insecure: url.starts_with("http://"),
            username: None,
            password: None,
            token: None,
            visibility: Visibility::Auto,
        }
    }
}

/// The registries wharf knows without configuration. Anything else must be configured: never an open proxy.
pub const BUILTIN_REGISTRIES: &[(&str, &str)] = &[
    ("docker.io", "https://registry-1.docker.io"),
    ("ghcr.io", "https://ghcr.io"),
    ("quay.io", "https://quay.io"),
    ("registry.k8s.io", "https://registry.k8s.io"),
    ("gcr.io", "https://gcr.io"),
    ("mcr.microsoft.com", "https://mcr.microsoft.com"),
    ("public.ecr.aws", "https://public.ecr.aws"),
];

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            data_dir: PathBuf::from("./wharf-data"),
            default_registry: "docker.io".into(),
            tag_ttl: 60,
            log_format: LogFormat::Text,
            credentials_file: None,
            shutdown_grace: 30,
            upstream: UpstreamSettings::default(),
            cache: CacheSettings::default(),
            warm: WarmSettings::default(),
            admin: AdminSettings::default(),
            access: AccessSettings::default(),
            server: ServerSettings::default(),
            cluster: ClusterSettings::default(),
            storage: StorageSettings::default(),
            registries: BUILTIN_REGISTRIES.iter().map(|(n, u)| (n.to_string(), RegistryConfig::at(u))).collect(),
        }
    }
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: 10,
            read_timeout: 60,
            ca_files: Vec::new(),
            max_redirects: 10,
            fill_chunk_size: 16 * 1024 * 1024,
            fill_concurrency: 16,
        }
    }
}

/// Values given as command-line flags; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--default-registry`.
    pub default_registry: Option<String>,
    /// `--tag-ttl`.
    pub tag_ttl: Option<u64>,
    /// `--credentials`.
    pub credentials_file: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--upstream NAME=URL`, repeatable.
    pub upstreams: Vec<(String, String)>,
    /// `--peer-listen`, `--peers`, `--peers-file`, `--peers-dns`, `--peer-dns-server`, `--peer-key-file`,
    /// `--peer-self`.
    pub cluster: ClusterOverrides,
}

/// Cluster flags; `None` leaves the lower layers alone.
#[derive(Debug, Default, Clone)]
pub struct ClusterOverrides {
    /// `--peer-listen`.
    pub peer_listen: Option<String>,
    /// `--peers` (comma-separated).
    pub peers: Option<Vec<String>>,
    /// `--peers-file`.
    pub peers_file: Option<PathBuf>,
    /// `--peers-dns`.
    pub peers_dns: Option<String>,
    /// `--peer-dns-server`.
    pub dns_server: Option<String>,
    /// `--peer-key-file`.
    pub key_file: Option<PathBuf>,
    /// `--peer-self`.
    pub self_addr: Option<String>,
}

impl Config {
    /// Builds the layered configuration and validates it.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, Error> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(Error::Value {
                    key: "--config".into(),
                    reason: format!("{} is not a file", file.display()),
                });
            }
            fig = fig.merge(Toml::file(file));
        }
        fig = fig.merge(Env::prefixed("WHARF_").split("__"));
        let mut config: Config = fig.extract().map_err(Box::new)?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.default_registry {
            self.default_registry = v.clone();
        }
        if let Some(v) = o.tag_ttl {
            self.tag_ttl = v;
        }
        if let Some(v) = &o.credentials_file {
            self.credentials_file = Some(v.clone());
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        let (c, oc) = (&mut self.cluster, &o.cluster);
        for (field, value) in [
            (&mut c.peer_listen, &oc.peer_listen),
            (&mut c.peers_dns, &oc.peers_dns),
            (&mut c.dns_server, &oc.dns_server),
            (&mut c.self_addr, &oc.self_addr),
        ] {
            if let Some(v) = value {
                field.clone_from(v);
            }
        }
        if let Some(v) = &oc.peers {
            c.peers.clone_from(v);
        }
        if let Some(v) = &oc.peers_file {
            c.peers_file = Some(v.clone());
        }
        if let Some(v) = &oc.key_file {
            c.key_file = Some(v.clone());
        }
        for (name, url) in &o.upstreams {
            let entry = self.registries.entry(name.clone()).or_insert_with(|| RegistryConfig::at(url));
            entry.url = url.clone();
            entry.insecure |= url.starts_with("http://");
        }
    }

    /// A copy fit to print: every secret (registry passwords and tokens, client tokens, the admin token)
    /// replaced by `<redacted>`.
    pub fn redacted(&self) -> Config {
        const R: &str = "<redacted>";
        let mut c = self.clone();
        for reg in c.registries.values_mut() {
            for secret in [&mut reg.password, &mut reg.token] {
                if secret.is_some() {
                    *secret = Some(R.into());
                }
            }
        }
        for t in &mut c.access.tokens {
            t.token = R.into();
        }
        if !c.admin.token.is_empty() {
            c.admin.token = R.into();
        }
        if let Some(s3) = &mut c.storage.s3
            && s3.secret_access_key.is_some()
        {
            s3.secret_access_key = Some(R.into());
        }
        c
    }

    /// Checks what serde cannot: URLs, schemes and references between keys.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, reg) in &self.registries {
            let key = format!("registries.\"{name}\".url");
            let url =
                url::Url::parse(&reg.url).map_err(|e| Error::Value { key: key.clone(), reason: e.to_string() })?;
            match url.scheme() {
                "https" => {}
                "http" if reg.insecure => {}
                "http" => {
                    return Err(Error::Value { key, reason: "plain http needs `insecure = true`".into() });
                }
                other => {
                    return Err(Error::Value { key, reason: format!("unsupported scheme {other:?}") });
                }
            }
            if name.is_empty() || name.contains('/') {
                return Err(Error::Value {
                    key: format!("registries.\"{name}\""),
                    reason: "not a registry name".into(),
                });
            }
        }
        let c = &self.cache;
        if c.low_watermark > c.high_watermark || c.high_watermark > 100 {
            return Err(Error::Value {
                key: "cache.low_watermark".into(),
                reason: "watermarks need 0 <= low <= high <= 100".into(),
            });
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<SocketAddr>().is_err() {
            return Err(Error::Value {
                key: "admin.listen".into(),
                reason: "not an address such as 127.0.0.1:5001".into(),
            });
        }
        for t in &self.access.tokens {
            let key = format!("access.tokens[{}]", t.name);
            if t.token.len() < 16 {
                return Err(Error::Value { key, reason: "a client token needs at least 16 characters".into() });
            }
            if t.read.iter().any(|p| !p.contains('/') && p != "**") {
                return Err(Error::Value { key, reason: "`read` patterns are registry/repository".into() });
            }
        }
        let s = &self.server;
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(Error::Value {
                key: "server.tls_key".into(),
                reason: "TLS needs both tls_cert and tls_key".into(),
            });
        }
        if s.max_connections == 0 || s.max_fills == 0 {
            return Err(Error::Value {
                key: "server.max_connections".into(),
                reason: "limits must be at least 1".into(),
            });
        }
        self.validate_cluster()?;
        self.validate_s3()?;
        self.validate_warm()?;
        if !self.registries.contains_key(&self.default_registry) {
            return Err(Error::Value {
                key: "default_registry".into(),
                reason: format!("{:?} is not a configured registry", self.default_registry),
            });
        }
        Ok(())
    }
}

impl Config {
    fn validate_warm(&self) -> Result<(), Error> {
        let w = &self.warm;
        let bad = |key: &str, reason: &str| Error::Value { key: format!("warm.{key}"), reason: reason.into() };
        if !w.runtime_endpoint.is_empty() && !w.runtime_endpoint.starts_with("unix:///") {
            return Err(bad("runtime_endpoint", "only unix:///path sockets are supported"));
        }
        if w.runtime_timeout == 0 || w.runtime_pull_timeout == 0 {
            return Err(bad("runtime_timeout", "runtime timeouts must be at least 1 second"));
        }
        for image in &w.images {
            if image.pin_in_runtime && !image.into_runtime {
                return Err(bad("images", &format!("{}: pin_in_runtime needs into_runtime = true", image.image)));
            }
            if image.into_runtime && w.runtime_endpoint.is_empty() {
                return Err(bad("images", &format!("{}: into_runtime needs warm.runtime_endpoint", image.image)));
            }
        }
        Ok(())
    }

    fn validate_s3(&self) -> Result<(), Error> {
        let Some(s3) = &self.storage.s3 else { return Ok(()) };
        let bad = |key: &str, reason: &str| Error::Value { key: format!("storage.s3.{key}"), reason: reason.into() };
        if s3.bucket.is_empty() {
            return Err(bad("bucket", "the bucket's name is needed"));
        }
        if s3.endpoint.starts_with("http://") && !s3.allow_http {
            return Err(bad("endpoint", "plain http needs `allow_http = true`"));
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            return Err(bad("access_key_id", "set both access_key_id and secret_access_key, or neither"));
        }
        Ok(())
    }

    fn validate_cluster(&self) -> Result<(), Error> {
        let c = &self.cluster;
        let bad = |key: &str, reason: &str| Error::Value { key: format!("cluster.{key}"), reason: reason.into() };
        if !c.enabled() {
            return Ok(());
        }
        let listen: SocketAddr =
            c.peer_listen.parse().map_err(|_| bad("peer_listen", "not an address such as 10.0.0.5:5001"))?;
        let overlaps =
            listen.ip() == self.listen.ip() || listen.ip().is_unspecified() || self.listen.ip().is_unspecified();
        if listen.port() == self.listen.port() && listen.port() != 0 && overlaps {
            return Err(bad("peer_listen", "the peer API needs a listener of its own, not the client API's"));
        }
        if c.self_addr.is_empty() && listen.ip().is_unspecified() {
            return Err(bad(
                "self",
                "needed when peer_listen is a wildcard address: this node's address as the others see it",
            ));
        }
        if !c.self_addr.is_empty() && c.self_addr.parse::<SocketAddr>().is_err() {
            return Err(bad("self", "not an address such as 10.0.0.5:5001"));
        }
        if c.peers.is_empty() && c.peers_file.is_none() && c.peers_dns.is_empty() {
            return Err(bad("peers", "the cluster needs peers, peers_file or peers_dns"));
        }
        if c.key_file.is_none() {
            return Err(bad("key_file", "peer requests are signed: the cluster needs the shared key file"));
        }
        if !c.peers_dns.is_empty() && c.peers_dns.rsplit_once(':').is_none_or(|(_, p)| p.parse::<u16>().is_err()) {
            return Err(bad("peers_dns", "expected name:port of a headless Service"));
        }
        if !c.dns_server.is_empty() && c.dns_server.parse::<SocketAddr>().is_err() {
            return Err(bad("dns_server", "not an address such as 127.0.0.1:53"));
        }
        if c.stall_timeout == 0 || c.connect_timeout_ms == 0 || c.dns_interval == 0 {
            return Err(bad("stall_timeout", "cluster timeouts must be at least 1"));
        }
        Ok(())
    }
}

/// Parses `NAME=URL` for `--upstream`.
pub fn parse_upstream_flag(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("expected REGISTRY=URL, got {s:?}"))?;
    if name.is_empty() || url.is_empty() {
        return Err(format!("expected REGISTRY=URL, got {s:?}"));
    }
    Ok((name.to_owned(), url.trim_end_matches('/').to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_equals_defaults() {
        let text = include_str!("../config/wharf.toml");
        let parsed: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .expect("config/wharf.toml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn the_cluster_needs_its_own_listener_peers_and_a_key() {
        let cluster = |c: ClusterOverrides| Config::load(None, &Overrides { cluster: c, ..Default::default() });
        let ok = || ClusterOverrides {
            peer_listen: Some("10.0.0.5:5001".into()),
            peers: Some(vec!["10.0.0.5:5001".into()]),
            key_file: Some("/keys".into()),
            ..Default::default()
        };
        let c = cluster(ok()).unwrap().cluster;
        assert!(c.enabled());
        assert_eq!(c.peers, ["10.0.0.5:5001"]);
        let refused = |o: ClusterOverrides, key: &str| match cluster(o) {
            Err(Error::Value { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        };
        refused(ClusterOverrides { peer_listen: Some("10.0.0.5:5000".into()), ..ok() }, "cluster.peer_listen");
        refused(ClusterOverrides { peer_listen: Some("0.0.0.0:5001".into()), ..ok() }, "cluster.self");
        refused(ClusterOverrides { peers: Some(vec![]), ..ok() }, "cluster.peers");
        refused(ClusterOverrides { key_file: None, ..ok() }, "cluster.key_file");
        refused(ClusterOverrides { peers_dns: Some("no-port".into()), ..ok() }, "cluster.peers_dns");
        let wildcard = ClusterOverrides {
            peer_listen: Some("0.0.0.0:5001".into()),
            self_addr: Some("10.0.0.5:5001".into()),
            ..ok()
        };
        assert!(cluster(wildcard).is_ok());
        // Off unless peer_listen is set: the other keys alone change nothing.
        assert!(!cluster(ClusterOverrides { peer_listen: None, ..ok() }).unwrap().cluster.enabled());
    }

    #[test]
    fn flags_override_and_http_upstreams_are_insecure() {
        let o = Overrides {
            tag_ttl: Some(5),
            upstreams: vec![("local.test".into(), "http://127.0.0.1:1".into())],
            ..Default::default()
        };
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.tag_ttl, 5);
        assert!(c.registries["local.test"].insecure);
        assert!(c.registries.contains_key("docker.io"));
    }

    #[test]
    fn a_bucket_needs_a_name_https_unless_allowed_and_both_keys_or_neither() {
        let ok = || S3Settings {
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: "http://127.0.0.1:9000".into(),
            region: default_region(),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            allow_http: true,
            breaker_seconds: 60,
            part_timeout_seconds: 60,
        };
        let check = |s: S3Settings| {
            let mut c = Config::default();
            c.storage.s3 = Some(s);
            c.validate()
        };
        assert!(check(ok()).is_ok());
        let refused = |s: S3Settings, key: &str| match check(s) {
            Err(Error::Value { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        };
        refused(S3Settings { bucket: String::new(), ..ok() }, "storage.s3.bucket");
        refused(S3Settings { allow_http: false, ..ok() }, "storage.s3.endpoint");
        refused(S3Settings { secret_access_key: None, ..ok() }, "storage.s3.access_key_id");
        assert!(check(S3Settings { access_key_id: None, secret_access_key: None, ..ok() }).is_ok());
    }

    #[test]
    fn runtime_images_need_a_unix_endpoint_and_pins_need_into_runtime() {
        let warm = |endpoint: &str, into_runtime, pin_in_runtime| {
            let mut c = Config::default();
            c.warm.runtime_endpoint = endpoint.into();
            let image = "docker.io/library/nginx:1.27".into();
            c.warm.images.push(WarmImage { image, platforms: vec![], into_runtime, pin_in_runtime });
            c.validate()
        };
        let sock = "unix:///run/containerd/containerd.sock";
        assert!(warm(sock, true, true).is_ok());
        assert!(warm("", false, false).is_ok());
        for (endpoint, into, pin) in [("", true, false), (sock, false, true), ("tcp://127.0.0.1:1", true, false)] {
            assert!(matches!(warm(endpoint, into, pin), Err(Error::Value { .. })), "{endpoint} {into} {pin}");
        }
    }

    #[test]
    fn http_without_insecure_is_refused() {
        let mut c = Config::default();
        c.registries.insert("x".into(), RegistryConfig { insecure: false, ..RegistryConfig::at("http://x") });
        assert!(matches!(c.validate(), Err(Error::Value { .. })));
    }

    #[test]
    fn printed_config_carries_no_secret() {
        let mut c = Config::default();
        c.registries
            .insert("x".into(), RegistryConfig { password: Some("hunter2".into()), ..RegistryConfig::at("https://x") });
        c.access.tokens.push(ClientToken { name: "ci".into(), token: "client-secret-123456".into(), read: vec![] });
        c.admin.token = "admin-secret".into();
        let text = toml::to_string(&c.redacted()).unwrap();
        for secret in ["hunter2", "client-secret-123456", "admin-secret"] {
            assert!(!text.contains(secret), "{secret} printed");
        }
        assert!(text.contains("name = \"ci\""));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let r = RegistryConfig { password: Some("hunter2".into()), ..RegistryConfig::at("https://x") };
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
