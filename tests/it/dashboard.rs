//! The Grafana dashboard (`deploy/grafana/wharf-dashboard.json`) is valid JSON and queries only metric
//! families wharf registers, so a renamed metric cannot leave a panel silently empty.

use std::collections::BTreeSet;
use wharf::metrics::{
    DirectionLabel, ImageLabel, KindLabel, Metrics, ReasonLabel, RegistryLabel, RequestLabels, UpstreamLabels,
};

/// Metrics with a sample in every labelled family (an empty family is not exported at all).
fn every_family() -> Metrics {
    let m = Metrics::new();
    let registry = RegistryLabel { registry: "docker.io".into() };
    m.requests.get_or_create(&RequestLabels { route: "blob", method: "GET".into(), status: 200 }).inc();
    m.cache_outcome("blob", "hit");
    m.upstream_bytes.get_or_create(&registry).inc();
    m.upstream_requests.get_or_create(&UpstreamLabels { registry: "docker.io".into(), status: 200 }).inc();
    m.upstream_latency.get_or_create(&registry).observe(0.1);
    m.ratelimit_remaining.get_or_create(&registry).set(1);
    m.fill_failures.get_or_create(&ReasonLabel { reason: "upstream" }).inc();
    m.uncached.get_or_create(&ReasonLabel { reason: "disk_full" }).inc();
    m.warm_ready.get_or_create(&ImageLabel { image: "x".into() }).set(1);
    m.warm_last_success.get_or_create(&ImageLabel { image: "x".into() }).set(1);
    m.warm_in_runtime.get_or_create(&ImageLabel { image: "x".into() }).set(1);
    m.warm_runtime_pinned.get_or_create(&ImageLabel { image: "x".into() }).set(1);
    m.upstream_joined.get_or_create(&KindLabel { kind: "manifest" }).inc();
    m.peer_bytes.get_or_create(&DirectionLabel { direction: "in" }).inc();
    m.peer_fallbacks.get_or_create(&ReasonLabel { reason: "unreachable" }).inc();
    m.bucket_bytes.get_or_create(&ReasonLabel { reason: "read" }).inc();
    m.bucket_requests.get_or_create(&ReasonLabel { reason: "hit" }).inc();
    m.bucket_errors.get_or_create(&ReasonLabel { reason: "denied" }).inc();
    m
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/wharf-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // Families as registered: `# TYPE <name> <type>`; samples add `_total`, `_bucket`, `_count`, `_sum`.
    let text = every_family().encode();
    let families: BTreeSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("wharf_") {
            let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[i + name.len()..];
            let family = ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s));
            let family = family.unwrap_or(&name).to_owned();
            assert!(families.contains(family.as_str()), "{name} in {expr:?} is not exported; families: {families:?}");
            if name.ends_with("_total") {
                assert!(text.contains(&format!("# TYPE {family} counter")), "{name}: only counters end in _total");
            }
            used.insert(family);
        }
    }
    for needed in [
        "wharf_cache_requests",
        "wharf_served_blob_bytes",
        "wharf_upstream_fetched_bytes",
        "wharf_fill_duration_seconds",
        "wharf_filesystem_used_ratio",
        "wharf_high_watermark_ratio",
        "wharf_low_watermark_ratio",
        "wharf_cache_used_bytes",
        "wharf_http_requests",
        "wharf_warm_image_ready",
        "wharf_peer_bytes",
        "wharf_peer_fallbacks",
        "wharf_peer_corrupt",
        "wharf_peers_ready",
        "wharf_owner_changes",
        "wharf_bucket_bytes",
        "wharf_bucket_requests",
        "wharf_bucket_errors",
        "wharf_bucket_uploads_abandoned",
        "wharf_bucket_breaker_open",
    ] {
        assert!(used.contains(needed), "no panel plots {needed}");
    }
}
