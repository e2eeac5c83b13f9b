//! Prometheus metrics: every family registered once at start-up and shared as `Arc<Metrics>`; no global
//! statics. A leaf module (it imports nothing from the crate), so any room may record into it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `base`, `manifest`, `blob`, `tags`, `referrers`, `ops`, `other`.
    pub route: &'static str,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// Labels of a cache decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `blob` or `manifest`.
    pub kind: &'static str,
    /// `hit`, `miss`, `coalesced`, `revalidated`, `stale`, `passthrough`, `uncached`.
    pub outcome: &'static str,
}

/// Labels of an upstream request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Registry name.
    pub registry: String,
    /// Status code, or 0 when no response arrived.
    pub status: u16,
}

/// A registry label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabel {
    /// Registry name.
    pub registry: String,
}

/// A reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// A kind label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What kind of thing.
    pub kind: &'static str,
}

/// A warm-list image label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabel {
    /// The image reference as configured.
    pub image: String,
}

/// The direction of peer traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in` (received from peers) or `out` (sent to peers).
    pub direction: &'static str,
}

/// Every metric wharf exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Cache decisions by kind and outcome.
    pub cache: Family<CacheLabels, Counter>,
    /// Bytes of blob bodies sent to clients.
    pub served_bytes: Counter,
    /// Bytes fetched from upstreams for blobs.
    pub upstream_bytes: Family<RegistryLabel, Counter>,
    /// Upstream requests by registry and status.
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    /// Upstream request latency until the response headers, by registry.
    pub upstream_latency: Family<RegistryLabel, Histogram>,
    /// Time from the start of a fill to its commit.
    pub fill_duration: Histogram,
    /// Fills running now.
    pub fills_in_flight: Gauge,
    /// Fills that failed, by reason.
    pub fill_failures: Family<ReasonLabel, Counter>,
    /// Blobs streamed without being cached, by reason (`too_large`, `disk_full`).
    pub uncached: Family<ReasonLabel, Counter>,
    /// Manifests served stale because the upstream failed.
    pub stale_served: Counter,
    /// Blobs evicted.
    pub evictions: Counter,
    /// Bytes evicted.
    pub evicted_bytes: Counter,
    /// Bytes of cached blobs.
    pub cache_bytes: Gauge,
    /// The byte budget (0: none).
    pub cache_max_bytes: Gauge,
    /// Used fraction of the cache's filesystem.
    pub filesystem_used_ratio: Gauge<f64, AtomicU64>,
    /// The high watermark as a fraction.
    pub high_watermark_ratio: Gauge<f64, AtomicU64>,
    /// The low watermark as a fraction.
    pub low_watermark_ratio: Gauge<f64, AtomicU64>,
    /// 1 when a warm image is fully cached and pinned, else 0.
    pub warm_ready: Family<ImageLabel, Gauge>,
    /// Unix time of a warm image's last successful refresh.
    pub warm_last_success: Family<ImageLabel, Gauge>,
    /// 1 when the node's runtime holds a warm image at wharf's current digest (images marked `into_runtime`).
    pub warm_in_runtime: Family<ImageLabel, Gauge>,
    /// 1 when the runtime's record of a warm image carries the pin label.
    pub warm_runtime_pinned: Family<ImageLabel, Gauge>,
    /// Docker Hub's `ratelimit-remaining`, as last reported.
    pub ratelimit_remaining: Family<RegistryLabel, Gauge>,
    /// Requests that waited for another request's identical upstream request instead of sending their own.
    pub upstream_joined: Family<KindLabel, Counter>,
    /// Times the metadata database failed (each failure counted once, however many requests met it).
    pub metadata_failures: Counter,
    /// 1 while the metadata database is failed and being reopened, else 0.
    pub metadata_degraded: Gauge,
    /// Blob bytes received from (`in`) and sent to (`out`) peers.
    pub peer_bytes: Family<DirectionLabel, Counter>,
    /// Times a peer could not supply a blob or manifest and the next source was used, by reason.
    pub peer_fallbacks: Family<ReasonLabel, Counter>,
    /// Blobs whose bytes from a peer failed verification.
    pub peer_corrupt: Counter,
    /// Peers in this node's current view (itself included when listed).
    pub peers_ready: Gauge,
    /// Changes of the peer view; each moves the owners of the keys of the peers that came or went.
    pub owner_changes: Counter,
    /// Bucket bytes `read` and `written`.
    pub bucket_bytes: Family<ReasonLabel, Counter>,
    /// Bucket requests by result: `hit`, `miss`, `error` (which opens the breaker), `corrupt` (an object
    /// that failed verification).
    pub bucket_requests: Family<ReasonLabel, Counter>,
    /// Bucket failures by kind: `denied` (credentials or permissions), `timeout` (no answer within the
    /// bound), `unavailable` (connection, 5xx and the rest).
    pub bucket_errors: Family<ReasonLabel, Counter>,
    /// Uploads to the bucket given up (and aborted).
    pub bucket_abandoned: Counter,
    /// 1 while the bucket is skipped after a failure, else 0.
    pub bucket_breaker_open: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("wharf");
        let latency = || Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let m = Metrics {
            requests: Family::default(),
            cache: Family::default(),
            served_bytes: Counter::default(),
            upstream_bytes: Family::default(),
            upstream_requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency),
            fill_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            fills_in_flight: Gauge::default(),
            fill_failures: Family::default(),
            uncached: Family::default(),
            stale_served: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            filesystem_used_ratio: Gauge::default(),
            high_watermark_ratio: Gauge::default(),
            low_watermark_ratio: Gauge::default(),
            warm_ready: Family::default(),
            warm_last_success: Family::default(),
            warm_in_runtime: Family::default(),
            warm_runtime_pinned: Family::default(),
            ratelimit_remaining: Family::default(),
            upstream_joined: Family::default(),
            metadata_failures: Counter::default(),
            metadata_degraded: Gauge::default(),
            peer_bytes: Family::default(),
            peer_fallbacks: Family::default(),
            peer_corrupt: Counter::default(),
            peers_ready: Gauge::default(),
            owner_changes: Counter::default(),
            bucket_bytes: Family::default(),
            bucket_requests: Family::default(),
            bucket_errors: Family::default(),
            bucket_abandoned: Counter::default(),
            bucket_breaker_open: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("http_requests", "HTTP requests by route, method and status", m.requests.clone());
        r.register("cache_requests", "Cache decisions for blobs and manifests", m.cache.clone());
        r.register("served_blob_bytes", "Blob bytes sent to clients", m.served_bytes.clone());
        r.register("upstream_fetched_bytes", "Blob bytes fetched from upstreams", m.upstream_bytes.clone());
        r.register("upstream_requests", "Upstream requests by registry and status", m.upstream_requests.clone());
        r.register_with_unit(
            "upstream_request_duration",
            "Upstream latency until response headers",
            prometheus_client::registry::Unit::Seconds,
            m.upstream_latency.clone(),
        );
        r.register_with_unit(
            "fill_duration",
            "Time from the start of a blob fill to its commit",
            prometheus_client::registry::Unit::Seconds,
            m.fill_duration.clone(),
        );
        r.register("fills_in_flight", "Blob fills running now", m.fills_in_flight.clone());
        r.register("fill_failures", "Blob fills that failed, by reason", m.fill_failures.clone());
        r.register(
            "uncached_blobs",
            "Blobs (and manifests, on a full disk) served without being cached, by reason",
            m.uncached.clone(),
        );
        r.register(
            "stale_manifests_served",
            "Manifests served stale because the upstream failed",
            m.stale_served.clone(),
        );
        r.register("evictions", "Blobs evicted", m.evictions.clone());
        r.register_with_unit(
            "evicted",
            "Bytes evicted",
            prometheus_client::registry::Unit::Bytes,
            m.evicted_bytes.clone(),
        );
        r.register_with_unit(
            "cache_used",
            "Bytes of cached blobs",
            prometheus_client::registry::Unit::Bytes,
            m.cache_bytes.clone(),
        );
        r.register_with_unit(
            "cache_budget",
            "Byte budget of the cache (0: none)",
            prometheus_client::registry::Unit::Bytes,
            m.cache_max_bytes.clone(),
        );
        r.register("filesystem_used_ratio", "Used fraction of the cache's filesystem", m.filesystem_used_ratio.clone());
        r.register(
            "high_watermark_ratio",
            "Eviction starts above this filesystem usage",
            m.high_watermark_ratio.clone(),
        );
        r.register("low_watermark_ratio", "Eviction stops at this filesystem usage", m.low_watermark_ratio.clone());
        r.register("warm_image_ready", "1 when a warm-list image is cached and pinned", m.warm_ready.clone());
        r.register(
            "warm_image_last_success_timestamp_seconds",
            "Unix time of a warm image's last successful refresh",
            m.warm_last_success.clone(),
        );
        r.register(
            "warm_image_in_runtime",
            "1 when the node's container runtime holds a warm image at wharf's current digest",
            m.warm_in_runtime.clone(),
        );
        r.register(
            "warm_image_runtime_pinned",
            "1 when the runtime's record of a warm image carries the pin label (kubelet image GC skips it)",
            m.warm_runtime_pinned.clone(),
        );
        r.register(
            "upstream_ratelimit_remaining",
            "Pull rate limit remaining as reported by the upstream (Docker Hub ratelimit-remaining)",
            m.ratelimit_remaining.clone(),
        );
        r.register(
            "upstream_requests_joined",
            "Requests answered by another request's identical upstream request (manifest, token) instead of their own",
            m.upstream_joined.clone(),
        );
        r.register(
            "metadata_failures",
            "Times the metadata database failed (a full disk, an I/O error); each is repaired without a restart",
            m.metadata_failures.clone(),
        );
        r.register(
            "metadata_degraded",
            "1 while the metadata database is failed and being reopened (blobs and manifests served from the files)",
            m.metadata_degraded.clone(),
        );
        r.register_with_unit(
            "peer",
            "Blob bytes received from (in) and sent to (out) other wharf instances",
            prometheus_client::registry::Unit::Bytes,
            m.peer_bytes.clone(),
        );
        r.register(
            "peer_fallbacks",
            "Times a peer could not supply content and the next source was used, by reason",
            m.peer_fallbacks.clone(),
        );
        r.register("peer_corrupt", "Blobs whose bytes from a peer failed verification", m.peer_corrupt.clone());
        r.register("peers_ready", "Peers in this node's current view of the cluster", m.peers_ready.clone());
        r.register(
            "owner_changes",
            "Changes of the peer view (each moves the owners of the peers that came or went)",
            m.owner_changes.clone(),
        );
        r.register_with_unit(
            "bucket",
            "Bytes read from and written to the shared bucket",
            prometheus_client::registry::Unit::Bytes,
            m.bucket_bytes.clone(),
        );
        r.register(
            "bucket_requests",
            "Bucket requests by result (hit, miss, error, corrupt)",
            m.bucket_requests.clone(),
        );
        r.register("bucket_errors", "Bucket failures by kind (denied, timeout, unavailable)", m.bucket_errors.clone());
        r.register(
            "bucket_uploads_abandoned",
            "Uploads to the bucket given up and aborted",
            m.bucket_abandoned.clone(),
        );
        r.register(
            "bucket_breaker_open",
            "1 while the bucket is skipped after a failure",
            m.bucket_breaker_open.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Counts a cache decision.
    pub fn cache_outcome(&self, kind: &'static str, outcome: &'static str) {
        self.cache.get_or_create(&CacheLabels { kind, outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_conventional_names() {
        let m = Metrics::new();
        m.cache_outcome("blob", "hit");
        m.served_bytes.inc_by(10);
        let text = m.encode();
        assert!(text.contains("wharf_cache_requests_total{kind=\"blob\",outcome=\"hit\"} 1"), "{text}");
        assert!(text.contains("wharf_served_blob_bytes_total 10"), "{text}");
        assert!(text.contains("# TYPE wharf_evicted_bytes counter"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
