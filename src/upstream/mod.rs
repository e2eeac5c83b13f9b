//! Upstream registries: which registry a request goes to, and the clients that talk to them.
//! Only configured registries are reachable: wharf is never an open proxy.

pub mod auth;
mod client;
pub mod creds;
mod error;
pub mod flight;

pub use client::{BlobStream, Identity, MAX_MANIFEST_SIZE, ManifestHead, Passthrough, Probe, RegistryClient};
pub use error::Error;

/// Parsers of upstream response headers, exported for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::client::{parse_content_range, redirect_target};
}

use crate::config::Config;
use crate::metrics::Metrics;
use crate::oci::RepoName;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Why a request could not be routed to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The `ns` parameter, or a host-like first path component (see [`is_host_like`]), names a registry that is
    /// not configured.
    #[error("registry {0:?} is not configured")]
    UnknownRegistry(String),
    /// A Docker Hub name whose first component is a registry host: no such repository can exist there.
    #[error("{0:?} names a registry host, not a Docker Hub repository")]
    ForeignName(String),
    /// The repository name is not valid.
    #[error(transparent)]
    Name(#[from] crate::oci::ParseError),
}

/// Failure to build the upstream clients at start-up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An extra CA file could not be read or parsed.
    #[error("CA file {0}: {1}")]
    Ca(String, String),
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// Credentials could not be loaded.
    #[error(transparent)]
    Creds(#[from] creds::Error),
    /// A registry URL is not valid.
    #[error("registry {0}: bad url")]
    Url(String),
}

/// Every configured upstream, by the registry name clients use.
#[derive(Debug, Clone)]
pub struct Upstreams {
    registries: Arc<HashMap<String, Arc<RegistryClient>>>,
    default: String,
}

impl Upstreams {
    /// Builds one shared connection pool (HTTP/2 where offered, rustls with platform roots plus extra CAs)
    /// and a client per configured registry.
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Result<Self, SetupError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(config.upstream.connect_timeout))
            .read_timeout(Duration::from_secs(config.upstream.read_timeout))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")));
        for path in &config.upstream.ca_files {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|e| SetupError::Ca(shown.clone(), e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| SetupError::Ca(shown.clone(), e.to_string()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(SetupError::Client)?;
        let mut creds = creds::load(config)?;
        let mut registries = HashMap::new();
        for (name, reg) in &config.registries {
            let base = url::Url::parse(&reg.url).map_err(|_| SetupError::Url(name.clone()))?;
            let client = RegistryClient::new(
                name.clone(),
                base,
                http.clone(),
                creds.remove(name),
                config.upstream.max_redirects,
                metrics.clone(),
                flight::limit(config),
            );
            registries.insert(name.clone(), Arc::new(client));
        }
        Ok(Upstreams { registries: Arc::new(registries), default: config.default_registry.clone() })
    }

    /// Chooses the upstream for a request, in order: containerd's `ns` parameter; a path prefix naming a
    /// configured registry (podman/CRI-O mirrors, curl); the default registry (Docker's `registry-mirrors`).
    /// Returns the client and the repository name as the upstream knows it.
    pub fn route(&self, ns: Option<&str>, path_name: &str) -> Result<(Arc<RegistryClient>, RepoName), RouteError> {
        let (first, rest) = match path_name.split_once('/') {
            Some((f, r)) => (f, Some(r)),
            None => (path_name, None),
        };
        let (registry, name) = match ns {
            Some(ns) => {
                let ns = canonical_registry(ns);
                let reg = self.registries.get(ns).ok_or_else(|| RouteError::UnknownRegistry(ns.to_owned()))?;
                // containerd with `override_path` sends both; strip the prefix when it repeats `ns`.
                let name = match rest {
                    Some(r) if canonical_registry(first) == ns => r,
                    _ => path_name,
                };
                (reg, name)
            }
            None => match (self.registries.get(canonical_registry(first)), rest) {
                (Some(reg), Some(r)) => (reg, r),
                // Docker's reference rule: such a first component is a registry host, never part of a
                // repository name. One that is not configured is refused here, before any upstream sees it.
                (None, Some(_)) if is_host_like(first) => return Err(RouteError::UnknownRegistry(first.to_owned())),
                _ => (&self.registries[&self.default], path_name),
            },
        };
        if registry.name == "docker.io"
            && let Some((component, _)) = name.split_once('/')
            && is_host_like(component)
        {
            // Docker Hub namespaces hold neither `.` nor `:`: a host-like component under `ns=docker.io` names
            // another registry, and Docker Hub would only answer 404 after a request counted against the limit.
            return Err(RouteError::ForeignName(name.to_owned()));
        }
        let mut repo = RepoName::parse(name)?;
        if registry.name == "docker.io" {
            repo = repo.with_library_prefix()?;
        }
        Ok((registry.clone(), repo))
    }

    /// The client for a registry name, if configured.
    pub fn get(&self, name: &str) -> Option<Arc<RegistryClient>> {
        self.registries.get(canonical_registry(name)).cloned()
    }
}

/// Whether the first component of an image name is a registry host in Docker's reference grammar: it holds a
/// `.` or a `:`, or is `localhost`.
pub fn is_host_like(component: &str) -> bool {
    component.contains(['.', ':']) || component == "localhost"
}

/// Docker Hub goes by several host names; clients and config files use any of them.
fn canonical_registry(name: &str) -> &str {
    match name {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn upstreams() -> Upstreams {
        let o = Overrides {
            upstreams: vec![("myreg.example:5000".into(), "http://127.0.0.1:1".into())],
            ..Default::default()
        };
        Upstreams::from_config(&Config::load(None, &o).unwrap(), Arc::default()).unwrap()
    }

    #[test]
    fn routes_by_ns_prefix_and_default() {
        let u = upstreams();
        let (r, n) = u.route(Some("docker.io"), "library/nginx").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("docker.io", "library/nginx"));
        let (r, n) = u.route(Some("myreg.example:5000"), "team/app").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("myreg.example:5000", "team/app"));
        let (r, n) = u.route(None, "ghcr.io/org/app").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("ghcr.io", "org/app"));
        let (r, n) = u.route(None, "nginx").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("docker.io", "library/nginx"));
        let (r, n) = u.route(Some("docker.io"), "docker.io/nginx").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("docker.io", "library/nginx"));
    }

    #[test]
    fn refuses_unconfigured_registries() {
        let u = upstreams();
        assert!(matches!(u.route(Some("evil.example"), "x/y"), Err(RouteError::UnknownRegistry(_))));
        // A host-like first component that is not configured is a registry wharf does not serve, never part
        // of a repository name and never a host to contact.
        for name in [
            "evil.example/x",
            "169.254.169.254/library/small",
            "metadata.google.internal/computeMetadata/v1",
            "docker.io.evil.test/library/small",
            "localhost/x",
            "localhost:5000/x",
            "myreg.example:5001/team/app",
            "[::1]:5000/x",
        ] {
            let refused = u.route(None, name);
            assert!(matches!(refused, Err(RouteError::UnknownRegistry(_))), "{name}: {refused:?}");
        }
        // Under `ns=docker.io` the same names are not Docker Hub repositories either.
        for name in ["evil.example/x", "localhost/x", "a:b/c", "ghcr.io/x"] {
            assert!(matches!(u.route(Some("docker.io"), name), Err(RouteError::ForeignName(_))), "{name}");
        }
        assert!(matches!(u.route(None, "docker.io/evil.example/x"), Err(RouteError::ForeignName(_))));
        // Other registries may have dotted path components (GitLab groups), and plain names still default.
        let (r, n) = u.route(Some("ghcr.io"), "my.group/app").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("ghcr.io", "my.group/app"));
        let (r, n) = u.route(None, "evil/x").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("docker.io", "evil/x"));
        let (r, n) = u.route(None, "evil.example").unwrap();
        assert_eq!((r.name.as_str(), n.as_str()), ("docker.io", "library/evil.example"));
    }

    #[test]
    fn refuses_names_too_long_for_docker_hub_library() {
        // Found by fuzzing: `library/` + a valid 250-character name went upstream as a 258-character name.
        let u = upstreams();
        let long = "a".repeat(250);
        assert!(matches!(u.route(None, &long), Err(RouteError::Name(_))));
        assert!(u.route(Some("ghcr.io"), &long).is_ok());
    }
}
