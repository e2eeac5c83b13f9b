//! Shared application state: cheap-clone handles to the config, the upstreams and the cache.

use crate::access::Access;
use crate::cache::Cache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Handles every request needs.
#[derive(Clone)]
pub struct AppState {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Upstream registries.
    pub upstreams: Upstreams,
    /// Blobs, manifests, tags.
    pub cache: Cache,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Who may read private content.
    pub access: Arc<Access>,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Upstream clients could not be built.
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
    /// A client token's pattern is invalid.
    #[error(transparent)]
    Access(#[from] crate::access::PatternError),
    /// The bucket could not be set up.
    #[error(transparent)]
    Bucket(#[from] crate::bucket::SetupError),
    /// The cluster tier could not be set up.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::SetupError),
    /// The data directory could not be opened.
    #[error("opening the data directory")]
    Cache(#[from] crate::cache::Error),
}

impl AppState {
    /// Builds the state from a validated config; background fills run on `tasks`. Blocking.
    pub fn open(config: Config, tasks: TaskTracker) -> Result<AppState, OpenError> {
        let metrics = Arc::new(Metrics::new());
        let upstreams = Upstreams::from_config(&config, metrics.clone())?;
        let access = Arc::new(Access::from_config(&config)?);
        let cache = Cache::open(&config, metrics.clone(), tasks)?;
        if let Some(cluster) = crate::cluster::Cluster::from_settings(&config.cluster, metrics.clone())? {
            cache.set_cluster(cluster);
        }
        if let Some(bucket) = crate::bucket::Bucket::from_settings(config.storage.s3.as_ref(), metrics.clone())? {
            cache.set_bucket(bucket);
        }
        Ok(AppState { config: Arc::new(config), upstreams, cache, metrics, access })
    }
}
