//! `/metrics` parses as Prometheus text format and its counters move as expected across a cold and a warm pull.

use crate::support::fake_upstream::{FakeUpstream, client, get_ok};
use crate::support::wharf::Wharf;
use std::collections::HashMap;

/// Parses the exposition format strictly enough to catch malformed output: `# HELP/TYPE/UNIT/EOF` lines,
/// and samples `name{label="value",…} number`. Returns sample → value.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "exposition must end with # EOF");
    for line in lines {
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT" | "EOF"), "bad comment line: {line}");
            assert!(kind == "EOF" || name.starts_with("wharf_"), "unprefixed metric: {line}");
            if kind == "TYPE" {
                typed.insert(name.to_string(), parts.next().unwrap_or("").to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample without value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name: {line}");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name: {line}");
                assert!(v.starts_with('"') && v.ends_with('"'), "unquoted label value: {line}");
            }
        }
        let family = typed.keys().find(|f| name.starts_with(f.as_str()));
        assert!(family.is_some(), "sample before its # TYPE: {line}");
        samples.insert(series.to_string(), value);
    }
    samples
}

async fn scrape(wharf: &Wharf) -> HashMap<String, f64> {
    let resp = client().get(format!("{}/metrics", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    parse(&resp.text().await.unwrap())
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_across_a_cold_and_a_warm_pull() {
    let fake = FakeUpstream::start().await;
    let (digest, data) = fake.add_random_blob(3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &fake.wharf_args());
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let size = data.len() as f64;

    let before = scrape(&wharf).await;
    get_ok(&client(), &url, &data).await;
    let cold = scrape(&wharf).await;
    get_ok(&client(), &url, &data).await;
    let warm = scrape(&wharf).await;

    let miss = r#"wharf_cache_requests_total{kind="blob",outcome="miss"}"#;
    let hit = r#"wharf_cache_requests_total{kind="blob",outcome="hit"}"#;
    let fetched = r#"wharf_upstream_fetched_bytes_total{registry="fake.test"}"#;
    let served = "wharf_served_blob_bytes_total";
    let ok_blob = r#"wharf_http_requests_total{route="blob",method="GET",status="200"}"#;
    assert_eq!((get(&before, miss), get(&before, hit)), (0.0, 0.0));
    assert_eq!((get(&cold, miss), get(&cold, hit)), (1.0, 0.0));
    assert_eq!((get(&warm, miss), get(&warm, hit)), (1.0, 1.0));
    assert_eq!(get(&cold, fetched), size);
    assert_eq!(get(&warm, fetched), size, "a warm pull fetched from upstream");
    assert_eq!((get(&cold, served), get(&warm, served)), (size, 2.0 * size));
    assert_eq!(get(&warm, ok_blob), 2.0);
    assert!(get(&warm, "wharf_cache_used_bytes") >= size);
    assert!(get(&warm, "wharf_fill_duration_seconds_count") >= 1.0);
    assert_eq!(get(&warm, "wharf_high_watermark_ratio"), 0.85);
    let upstream_ok: f64 = warm
        .iter()
        .filter(|(k, _)| k.starts_with(r#"wharf_upstream_requests_total{registry="fake.test",status="200"}"#))
        .map(|(_, v)| v)
        .sum();
    assert!(upstream_ok >= 1.0, "upstream requests not counted");
}

#[test]
fn the_parser_rejects_malformed_text() {
    for bad in
        ["wharf_x 1\n# EOF", "# TYPE wharf_x counter\nwharf_x{a=b} 1\n# EOF", "# TYPE wharf_x counter\nwharf_x 1"]
    {
        assert!(std::panic::catch_unwind(|| parse(bad)).is_err(), "accepted: {bad:?}");
    }
}
