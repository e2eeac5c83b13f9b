//! Results: one row per (case, peer), Markdown tables with the wharf/peer ratios of the same run, and the
//! issue's targets checked against the rows.

use crate::peers::PeerKind;
use crate::shim::Snapshot;
use std::fmt::Write as _;

/// Server-side and upstream figures of one measured run.
#[derive(Clone, Debug, Default)]
pub struct Measure {
    /// Seconds from the first client request to the last client byte.
    pub elapsed: f64,
    /// Server CPU seconds (utime + stime deltas; background fills included).
    pub cpu_s: f64,
    /// Peak of the sampled `VmRSS` sum (KiB).
    pub peak_rss_kib: u64,
    /// Shim traffic caused by the run (background fills included).
    pub up: Snapshot,
}

/// A transfer run: clients pulling images or blobs.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: u32,
    /// Groups rows compared with each other (same case, different peers).
    pub case: String,
    /// `app`, `large`, `huge`, `many`, …: what was pulled.
    pub image: &'static str,
    pub mode: String,
    pub peer: PeerKind,
    pub clients: usize,
    pub errors: Vec<String>,
    /// Seconds per successful pull (or per joiner).
    pub wall: Vec<f64>,
    /// Milliseconds to the first body byte.
    pub ttfb: Vec<f64>,
    /// Bytes the clients received and verified.
    pub bytes: u64,
    /// Bytes an ideal cache fetches upstream once (image or unique bytes).
    pub reference_bytes: u64,
    pub m: Measure,
    pub note: String,
}

impl Row {
    /// Aggregate client throughput in MB/s.
    pub fn mbps(&self) -> f64 {
        if self.m.elapsed > 0.0 { self.bytes as f64 / 1e6 / self.m.elapsed } else { 0.0 }
    }

    /// Server CPU seconds per GiB served.
    pub fn cpu_per_gib(&self) -> f64 {
        if self.bytes > 0 { self.m.cpu_s / (self.bytes as f64 / (1u64 << 30) as f64) } else { 0.0 }
    }

    /// Upstream bytes / reference bytes.
    pub fn dedupe(&self) -> f64 {
        if self.reference_bytes > 0 { self.m.up.bytes as f64 / self.reference_bytes as f64 } else { 0.0 }
    }
}

/// A request-rate run (`ab -k`).
#[derive(Clone, Debug, Default)]
pub struct RpsRow {
    /// `HEAD tag`, `GET digest`, …
    pub what: String,
    pub peer: Option<PeerKind>,
    pub rps: f64,
    pub complete: u64,
    pub failed: u64,
    pub non_2xx: u64,
    pub keep_alive: u64,
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
    pub up: Snapshot,
    pub note: String,
}

/// One scenario's table.
pub enum Table {
    Transfer(Vec<Row>),
    Rps(Vec<RpsRow>),
}

/// One scenario.
pub struct Section {
    pub scenario: u32,
    pub title: String,
    pub notes: Vec<String>,
    pub table: Table,
    /// The peer the ratio columns divide by the others (wharf; scenario 8: the cluster; 9: the bucket).
    pub base: PeerKind,
}

/// A target of an issue and whether it held.
pub struct Check {
    pub target: &'static str,
    /// None: not measured in this run.
    pub holds: Option<bool>,
    pub detail: String,
}

fn dist(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| s[(((s.len() - 1) as f64) * p).round() as usize];
    Some((q(0.5), q(0.9), s[s.len() - 1]))
}

fn fmt_secs(v: f64) -> String {
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") }
}

fn fmt_ratio(w: f64, p: f64) -> String {
    if w > 0.0 && p > 0.0 { format!("{:.2}×", w / p) } else { "—".into() }
}

/// Bytes as MB, two decimals below 10 MB.
pub fn mb(bytes: u64) -> String {
    let v = bytes as f64 / 1e6;
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.0}") }
}

/// The Markdown table of a transfer section; the ratio columns divide `base`'s figures by each peer's.
fn transfer_table(rows: &[Row], base: PeerKind, out: &mut String) {
    let b = match base {
        PeerKind::Cluster => "cluster",
        PeerKind::Bucket => "bucket",
        _ => base.name(),
    };
    let _ = writeln!(
        out,
        "| case | peer | clients | wall p50 / p90 / max (s) | TTFB p50 / max (ms) | MB/s | {b}/peer MB/s \
         | upstream req | upstream MB | dedupe | CPU-s/GiB | {b}/peer CPU | peak RSS MB | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    );
    for r in rows {
        let w = rows.iter().find(|x| x.case == r.case && x.peer == base && x.errors.is_empty());
        let (thr_ratio, cpu_ratio) = match w {
            Some(w) if r.peer != base => (fmt_ratio(w.mbps(), r.mbps()), fmt_ratio(w.cpu_per_gib(), r.cpu_per_gib())),
            _ => ("—".into(), "—".into()),
        };
        let wall = dist(&r.wall)
            .map(|(a, b, c)| format!("{} / {} / {}", fmt_secs(a), fmt_secs(b), fmt_secs(c)))
            .unwrap_or("—".into());
        let ttfb = dist(&r.ttfb).map(|(a, _, c)| format!("{a:.1} / {c:.1}")).unwrap_or("—".into());
        let dedupe = if r.reference_bytes > 0 && r.peer != PeerKind::Nginx {
            format!("{:.2}", r.dedupe())
        } else {
            "—".into()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {:.0} | {} |",
            r.case,
            r.peer.name(),
            r.clients,
            wall,
            ttfb,
            r.mbps(),
            thr_ratio,
            r.m.up.total_requests(),
            mb(r.m.up.bytes),
            dedupe,
            r.cpu_per_gib(),
            cpu_ratio,
            r.m.peak_rss_kib as f64 * 1024.0 / 1e6,
            r.errors.len()
        );
    }
}

fn rps_table(rows: &[RpsRow], out: &mut String) {
    out.push_str(
        "| request | peer | req/s | wharf/peer | complete | failed | non-2xx | keep-alive | upstream req \
         | server CPU µs/req | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let w = rows.iter().find(|x| x.what == r.what && x.peer == Some(PeerKind::Wharf));
        let ratio = match w {
            Some(w) if r.peer != Some(PeerKind::Wharf) => fmt_ratio(w.rps, r.rps),
            _ => "—".into(),
        };
        let cpu_us = if r.complete > 0 { format!("{:.1}", r.cpu_s * 1e6 / r.complete as f64) } else { "—".into() };
        let peer = r.peer.map(|p| p.name()).unwrap_or("nginx (static file)");
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            r.what,
            peer,
            r.rps,
            ratio,
            r.complete,
            r.failed,
            r.non_2xx,
            r.keep_alive,
            r.up.total_requests(),
            cpu_us,
            r.peak_rss_kib as f64 * 1024.0 / 1e6
        );
    }
}

/// Renders a section: title, table, notes (upstream requests by kind, errors, remarks).
pub fn render_section(s: &Section) -> String {
    let mut out = format!("### {}\n\n", s.title);
    match &s.table {
        // A skipped scenario: its notes say why.
        Table::Transfer(rows) if rows.is_empty() => {}
        Table::Transfer(rows) => {
            transfer_table(rows, s.base, &mut out);
            let mut details = Vec::new();
            for r in rows {
                let mut d = format!("{} / {}: upstream {}", r.case, r.peer.name(), r.m.up.summary());
                if r.m.up.conns > 0 {
                    let _ = write!(d, " ({} connections)", r.m.up.conns);
                }
                if !r.note.is_empty() {
                    let _ = write!(d, "; {}", r.note);
                }
                if let Some(e) = r.errors.first() {
                    let _ = write!(d, "; first error: {e}");
                }
                details.push(d);
            }
            out.push_str("\n<details><summary>upstream requests by kind, notes</summary>\n\n");
            for d in details {
                let _ = writeln!(out, "- {d}");
            }
            out.push_str("\n</details>\n");
        }
        Table::Rps(rows) => {
            rps_table(rows, &mut out);
            for r in rows.iter().filter(|r| !r.note.is_empty()) {
                let peer = r.peer.map(|p| p.name()).unwrap_or("nginx");
                let _ = writeln!(out, "\n- {} / {peer}: {}", r.what, r.note);
            }
        }
    }
    for n in &s.notes {
        let _ = write!(out, "\n{n}\n");
    }
    out.push('\n');
    out
}

fn transfer_rows(sections: &[Section], scenario: u32) -> Vec<&Row> {
    sections
        .iter()
        .filter(|s| s.scenario == scenario)
        .flat_map(|s| match &s.table {
            Table::Transfer(rows) => rows.iter().collect::<Vec<_>>(),
            Table::Rps(_) => Vec::new(),
        })
        .collect()
}

fn p50(v: &[f64]) -> f64 {
    dist(v).map(|d| d.0).unwrap_or(f64::NAN)
}

/// Evaluates issue 3's targets against the rows; `wharf_hwm_kib` is the highest `VmHWM` of any wharf.
pub fn checks(sections: &[Section], wharf_hwm_kib: u64) -> Vec<Check> {
    let mut out = Vec::new();

    // 1. Cold herd dedupe.
    let herd: Vec<&Row> = transfer_rows(sections, 3);
    let wh: Vec<&&Row> = herd.iter().filter(|r| r.peer == PeerKind::Wharf).collect();
    out.push(Check {
        target: "Cold herd: upstream bytes = 1.0 × image size for every N",
        holds: (!wh.is_empty()).then(|| wh.iter().all(|r| r.errors.is_empty() && r.dedupe() <= 1.01)),
        detail: wh.iter().map(|r| format!("{}: {:.3}", r.case, r.dedupe())).collect::<Vec<_>>().join("; "),
    });

    // 2. Cold single pull of the large layer: ≥ 3× faster than the proxy and direct (whole-blob clients).
    let cold: Vec<&Row> =
        transfer_rows(sections, 1).into_iter().filter(|r| r.image == "large" && r.mode == "whole").collect();
    let mut holds = None;
    let mut detail = Vec::new();
    for w in cold.iter().filter(|r| r.peer == PeerKind::Wharf) {
        for p in cold.iter().filter(|r| r.case == w.case && matches!(r.peer, PeerKind::Proxy | PeerKind::Direct)) {
            let speedup = p50(&p.wall) / p50(&w.wall);
            let ok = w.errors.is_empty() && speedup >= 3.0;
            holds = Some(holds.unwrap_or(true) && ok);
            detail.push(format!("{}: {:.2}× vs {}", w.case, speedup, p.peer.name()));
        }
    }
    out.push(Check {
        target: "Cold single pull, 1 GB layer, per-connection-limited upstream: wharf ≥ 3× faster than the \
                 reference proxy and than a direct pull",
        holds,
        detail: detail.join("; "),
    });

    // 3. Late joiners.
    let late: Vec<&Row> = transfer_rows(sections, 4).into_iter().filter(|r| r.peer == PeerKind::Wharf).collect();
    out.push(Check {
        target: "Late joiners: time to first byte under 50 ms while the fill is running",
        holds: (!late.is_empty()).then(|| {
            late.iter().all(|r| r.errors.is_empty() && !r.ttfb.is_empty() && r.ttfb.iter().all(|&t| t < 50.0))
        }),
        detail: late.iter().map(|r| format!("{}: {}", r.case, r.note)).collect::<Vec<_>>().join("; "),
    });

    // 4. Warm single pull vs nginx (whole-blob clients).
    let warm: Vec<&Row> = transfer_rows(sections, 2).into_iter().filter(|r| r.mode == "whole").collect();
    let mut holds = None;
    let mut detail = Vec::new();
    for w in warm.iter().filter(|r| r.peer == PeerKind::Wharf) {
        if let Some(n) = warm.iter().find(|r| r.case == w.case && r.peer == PeerKind::Nginx) {
            let thr = w.mbps() / n.mbps();
            let cpu = w.cpu_per_gib() / n.cpu_per_gib();
            let ok = w.errors.is_empty() && thr >= 0.8 && cpu <= 1.5;
            holds = Some(holds.unwrap_or(true) && ok);
            detail.push(format!("{}: throughput {:.2}× nginx, CPU/GiB {:.2}× nginx", w.case, thr, cpu));
        }
    }
    out.push(Check {
        target: "Warm single pull: throughput ≥ 0.8× nginx-with-sendfile, server CPU per GiB ≤ 1.5× nginx's",
        holds,
        detail: detail.join("; "),
    });

    // 5. Manifest HEAD by tag.
    let rps: Vec<&RpsRow> = sections
        .iter()
        .flat_map(|s| match &s.table {
            Table::Rps(rows) => rows.iter().collect::<Vec<_>>(),
            Table::Transfer(_) => Vec::new(),
        })
        .collect();
    let w = rps.iter().find(|r| r.what == "HEAD tag" && r.peer == Some(PeerKind::Wharf));
    // nginx's "HEAD tag" and "HEAD digest" are HEADs of the same static file: compare with the better one.
    let n = rps
        .iter()
        .filter(|r| r.what.starts_with("HEAD") && r.peer == Some(PeerKind::Nginx))
        .map(|r| r.rps)
        .fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.max(x))));
    let (holds, detail) = match (w, n) {
        (Some(w), Some(n)) => (
            Some(w.rps >= 0.5 * n && w.up.total_requests() == 0 && w.failed == 0 && w.non_2xx == 0),
            format!(
                "wharf {:.0} req/s = {:.2}× nginx's best static-file HEAD {:.0}; {} upstream requests",
                w.rps,
                w.rps / n,
                n,
                w.up.total_requests()
            ),
        ),
        _ => (None, String::new()),
    };
    out.push(Check {
        target: "Manifest HEAD by tag, warm, within the freshness window: ≥ half nginx's static-file HEAD req/s, \
                 and no upstream request",
        holds,
        detail,
    });

    // 6. RSS.
    let mut peak = wharf_hwm_kib;
    for s in sections {
        match &s.table {
            Table::Transfer(rows) => {
                for r in rows.iter().filter(|r| r.peer == PeerKind::Wharf) {
                    peak = peak.max(r.m.peak_rss_kib);
                }
            }
            Table::Rps(rows) => {
                for r in rows.iter().filter(|r| r.peer == Some(PeerKind::Wharf)) {
                    peak = peak.max(r.peak_rss_kib);
                }
            }
        }
    }
    let peak_mb = peak as f64 * 1024.0 / 1e6;
    out.push(Check {
        target: "Peak RSS under 100 MB throughout, independent of blob size and client count",
        holds: (peak > 0).then_some(peak_mb < 100.0),
        detail: format!("wharf peak RSS {peak_mb:.1} MB (VmHWM of every instance and sampled VmRSS)"),
    });
    out
}

/// Issue 12's targets for the cluster tier (scenario 8): upstream bytes 1.00× for a herd spread over the
/// nodes; herd completion within 1.25× of one instance serving the same herd; a warm blob through a peer at
/// ≥ 0.8× the throughput of a local warm hit.
pub fn cluster_checks(sections: &[Section]) -> Vec<Check> {
    let rows = transfer_rows(sections, 8);
    let herd: Vec<&Row> = rows.iter().copied().filter(|r| r.image == "app").collect();
    let completion = |r: &Row| r.wall.iter().copied().fold(f64::NAN, f64::max);
    let mut out = Vec::new();

    let clustered: Vec<&Row> = herd.iter().copied().filter(|r| r.peer == PeerKind::Cluster).collect();
    let detail = clustered
        .iter()
        .map(|c| {
            let others: Vec<String> = herd
                .iter()
                .filter(|r| r.case == c.case && r.peer != PeerKind::Cluster)
                .map(|r| format!("{} {:.2}", r.peer.name(), r.dedupe()))
                .collect();
            let others = if others.is_empty() { String::new() } else { format!(" ({})", others.join(", ")) };
            format!("{}: cluster {:.3}{others}", c.case, c.dedupe())
        })
        .collect::<Vec<_>>()
        .join("; ");
    out.push(Check {
        target: "Cluster: upstream bytes 1.00× the image for a herd spread over three nodes",
        holds: (!clustered.is_empty()).then(|| clustered.iter().all(|r| r.errors.is_empty() && r.dedupe() <= 1.01)),
        detail,
    });

    let mut holds = None;
    let mut detail = Vec::new();
    for c in &clustered {
        if let Some(one) = herd.iter().find(|r| r.case == c.case && r.peer == PeerKind::Wharf) {
            let ratio = completion(c) / completion(one);
            let ok = c.errors.is_empty() && one.errors.is_empty() && ratio <= 1.25;
            holds = Some(holds.unwrap_or(true) && ok);
            detail.push(format!(
                "{}: cluster {:.2} s, one instance {:.2} s: {ratio:.2}×",
                c.case,
                completion(c),
                completion(one)
            ));
        }
    }
    out.push(Check {
        target: "Cluster: herd completion within 1.25× of one instance serving the same herd",
        holds,
        detail: detail.join("; "),
    });

    let local = rows.iter().find(|r| r.mode == WARM_LOCAL);
    let peer = rows.iter().find(|r| r.mode == WARM_PEER);
    let (holds, detail) = match (local, peer) {
        (Some(l), Some(p)) => {
            let ratio = p.mbps() / l.mbps();
            (
                Some(l.errors.is_empty() && p.errors.is_empty() && ratio >= 0.8),
                format!("through a peer {:.0} MB/s, local hit {:.0} MB/s: {ratio:.2}×", p.mbps(), l.mbps()),
            )
        }
        _ => (None, String::new()),
    };
    out.push(Check { target: "Cluster: a warm blob through a peer at ≥ 0.8× a local warm hit", holds, detail });
    out
}

/// The `mode` of scenario 8's warm row served by the blob's owner itself.
pub const WARM_LOCAL: &str = "whole, local hit on the owner";
/// The `mode` of scenario 8's reference row: the owner's own cold fill from the unthrottled upstream.
pub const WARM_FILL: &str = "whole, cold fill on the owner";
/// The `mode` of scenario 8's warm row served by another node, which streams it from the owner.
pub const WARM_PEER: &str = "whole, through a peer";

/// Renders the target checks under `title`.
pub fn render_checks(title: &str, checks: &[Check]) -> String {
    let mut out = format!("### {title}\n\n| target | holds | figures |\n|---|---|---|\n");
    for c in checks {
        let holds = match c.holds {
            Some(true) => "**yes**",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {} |", c.target, holds, c.detail);
    }
    out.push('\n');
    out
}
