//! Hostile and broken input: thousands of malformed or adversarial requests over raw TCP. Every answer is an
//! OCI error with the right status (or hyper's own 4xx for requests that are not valid HTTP), the process
//! never panics, and nothing is written outside the data directory.

use crate::support::fake_upstream::FakeUpstream;
use crate::support::wharf::Wharf;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Sends raw bytes as one request and returns (status, body).
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(addr: std::net::SocketAddr, target: &[u8], extra: &str) -> (u16, String) {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(format!(" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n").as_bytes());
    raw(addr, &req)
}

fn assert_oci(status: u16, body: &str, what: &str) {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: {status} without OCI JSON: {body:?}"));
    let code = v["errors"][0]["code"].as_str().unwrap_or_else(|| panic!("{what}: no OCI code: {body}"));
    let expected: &[&str] = match status {
        400 => &["NAME_INVALID", "DIGEST_INVALID"],
        404 => &["NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"],
        405 => &["UNSUPPORTED"],
        416 => &["RANGE_INVALID"],
        503 => &["UNAVAILABLE"],
        other => panic!("{what}: unexpected status {other}: {body}"),
    };
    assert!(expected.contains(&code), "{what}: status {status} with code {code}");
}

fn snapshot(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(snapshot(&e.path()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_hostile_requests_get_oci_errors_and_break_nothing() {
    let fake = FakeUpstream::start().await;
    let (digest, _) = fake.add_random_blob(1000);
    let root = tempfile::tempdir().unwrap();
    let outside = root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("canary"), b"canary").unwrap();
    let wharf = Wharf::start(&root.path().join("data"), &fake.wharf_args());
    let addr = wharf.addr;
    let before = snapshot(&outside);
    let hex = &digest["sha256:".len()..];

    let names = [
        "..",
        "../..",
        "a/../../b",
        "%2e%2e/x",
        "%2e%2e%2fetc",
        "a/%2e%2e/b",
        "..%2f..%2fetc%2fpasswd",
        "a//b",
        "/a",
        "A",
        "a b",
        "a%00b",
        "a\\b",
        "-a",
        "a-",
        ".a",
        "a.",
        "a__",
        "x/./y",
        "~root",
    ];
    let digests = [
        "sha256:../../etc/passwd".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", &hex[..63]),
        format!("sha384:{}", "a".repeat(96)),
        format!("md5:{}", "a".repeat(32)),
        "sha256:".to_string(),
        ":".to_string(),
        format!("sha256:{hex}/../x"),
        format!("sha256%3A{hex}"),
        hex.to_string(),
    ];
    let tags = [".INVALID", "-x", &"a".repeat(129), "a:b", "%2e%2e", "a%00"];
    let mut targets: Vec<Vec<u8>> = Vec::new();
    for n in names {
        targets.push(format!("/v2/{n}/manifests/latest").into_bytes());
        targets.push(format!("/v2/{n}/blobs/{digest}").into_bytes());
        targets.push(format!("/v2/{n}/tags/list?n=-1&last=%00").into_bytes());
        for d in &digests {
            targets.push(format!("/v2/{n}/blobs/{d}").into_bytes());
            targets.push(format!("/v2/test/app/blobs/{d}?ns={n}").into_bytes());
            targets.push(format!("/v2/test/app/referrers/{d}").into_bytes());
        }
        for t in tags {
            targets.push(format!("/v2/{n}/manifests/{t}").into_bytes());
            targets.push(format!("/v2/test/app/manifests/{t}").into_bytes());
        }
    }
    targets.push(format!("/v2/{}/manifests/latest", "a/".repeat(200)).into_bytes());
    targets.push(format!("/v2/{}/manifests/latest", "a".repeat(300)).into_bytes());
    targets.push(b"/v2/test/app/blobs/\xff\xfe".to_vec());
    targets.push(b"/v2/\xc3\x28/manifests/latest".to_vec());
    targets.push(b"/v2/test/app/manifests/latest?ns=%FF%FE".to_vec());
    targets.push(format!("/v2/test/app/manifests/latest?ns={}", "x".repeat(5000)).into_bytes());

    let mut count = 0;
    for t in &targets {
        let (status, body) = get(addr, t, "");
        if status == 400 && body.is_empty() {
            // hyper refused a target that is not valid HTTP (e.g. raw non-ASCII bytes) before routing.
            continue;
        }
        assert_oci(status, &body, &String::from_utf8_lossy(t));
        count += 1;
    }
    for method in ["PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE"] {
        let req = format!(
            "{method} /v2/test/app/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        let (status, body) = raw(addr, req.as_bytes());
        assert_oci(status, &body, method);
        count += 1;
    }

    // Absurd ranges on a cached blob.
    let blob = format!("/v2/test/app/blobs/{digest}");
    let (status, _) = get(addr, blob.as_bytes(), "");
    assert_eq!(status, 200);
    let ranges = [
        "bytes=1000-",
        "bytes=99999999999999999999-",
        "bytes=-0",
        "bytes=5-1",
        "bytes=--1",
        "bytes=0-0,0-0,0-0",
        "bytes=18446744073709551615-18446744073709551615",
        "bits=0-1",
        &format!("bytes={}", "0-1,".repeat(2000)),
    ];
    for r in ranges {
        for _ in 0..100 {
            let (status, body) = get(addr, blob.as_bytes(), &format!("Range: {r}\r\n"));
            match status {
                200 | 206 => {}
                416 => assert_oci(status, &body, r),
                other => panic!("Range {r:?}: status {other}"),
            }
            count += 1;
        }
    }

    // A control character in a header is not HTTP: hyper answers 400 before wharf sees it.
    let (status, _) = get(addr, blob.as_bytes(), "Range: bytes=\u{1}\r\n");
    assert_eq!(status, 400);

    // Huge headers: hyper refuses them (431) or closes; wharf must survive.
    let (status, _) = get(addr, blob.as_bytes(), &format!("X-Big: {}\r\n", "a".repeat(1 << 20)));
    assert!(status == 431 || status == 0 || status == 400, "a 1 MiB header got {status}");
    for _ in 0..300 {
        let (status, body) = get(addr, b"/v2/../../../../etc/passwd", "");
        assert_oci(status, &body, "traversal");
        count += 1;
    }
    assert!(count > 2000, "only {count} requests checked");

    // Still healthy, never panicked, nothing written outside the data directory.
    let (status, _) = get(addr, b"/v2/", "");
    assert_eq!(status, 200);
    assert!(!wharf.log().contains("panicked"), "wharf panicked:\n{}", wharf.log());
    assert_eq!(snapshot(&outside), before, "files appeared outside the data directory");
    let entries: Vec<_> = std::fs::read_dir(root.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(entries.len(), 2, "unexpected files next to the data directory: {entries:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_like_prefixes_of_unconfigured_registries_never_reach_an_upstream() {
    let fake = FakeUpstream::start().await;
    let (digest, _) = fake.add_random_blob(1000);
    let root = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(&root.path().join("data"), &fake.wharf_args());
    let prefixes = [
        "169.254.169.254",
        "evil.example.test",
        "metadata.google.internal",
        "docker.io.evil.test",
        "localhost",
        "localhost:5000",
        "127.0.0.1:1",
        "fake.test.evil",
    ];
    let mut targets = Vec::new();
    for p in prefixes {
        targets.push(format!("/v2/{p}/library/small/manifests/1.0"));
        targets.push(format!("/v2/{p}/library/small/blobs/{digest}"));
        targets.push(format!("/v2/{p}/library/small/tags/list"));
        targets.push(format!("/v2/{p}/library/small/referrers/{digest}"));
        targets.push(format!("/v2/{p}/small/manifests/1.0"));
    }
    for target in &targets {
        for method in ["GET", "HEAD"] {
            let req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (status, body) = raw(wharf.addr, req.as_bytes());
            assert_eq!(status, 404, "{method} {target}");
            if method == "GET" {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{target}: {body}");
            }
        }
    }
    assert!(fake.requests().is_empty(), "requests reached the upstream: {:?}", fake.requests());
    // The same repository without the prefix is served from the default registry: the upstream was reachable.
    let (status, _) = get(wharf.addr, format!("/v2/library/small/blobs/{digest}").as_bytes(), "");
    assert_eq!(status, 200);
    assert_eq!(fake.blob_gets(&digest), 1);
}
