//! The listener: TLS with reload, HTTP/2 and HTTP/1.1, slow-loris and oversized heads cut off, idle
//! connections closed, the connection limit queues, a stalled upstream meets the request deadline, and
//! upstream fills queue behind their limit. Deadlines are checked as generous upper bounds only.

use crate::support::fake_upstream::{FakeUpstream, client, spawn_fetch};
use crate::support::wharf::Wharf;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts wharf with `toml` as its config file, plus `args`.
fn start_with(dir: &Path, toml: &str, mut args: Vec<String>) -> Wharf {
    let config = dir.join("wharf.toml");
    std::fs::write(&config, toml).unwrap();
    args.extend(["--config".to_string(), config.to_str().unwrap().to_string()]);
    Wharf::start(&dir.join("data"), &args)
}

fn addr(w: &Wharf) -> String {
    w.url().trim_start_matches("http://").to_string()
}

/// A self-signed certificate for 127.0.0.1 named `cn`: (cert path, key path).
fn certificate(dir: &Path, cn: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={cn}"), "-addext", "subjectAltName=IP:127.0.0.1"])
        // A leaf, not a CA: clients refuse a CA certificate as a server's own.
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl could not make a certificate");
    (cert, key)
}

fn tls_client(ca: &Path, http1: bool) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(30));
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// Reads until the server closes the connection; returns what arrived, or panics after `limit`.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut buf)).await {
        Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => panic!("the server kept the connection open for {limit:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_http2_and_http1_and_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = certificate(dir.path(), "wharf-a");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let toml = format!("[server]\ntls_cert = {:?}\ntls_key = {:?}\n", cert, key);
    let up = FakeUpstream::start().await;
    let wharf = start_with(dir.path(), &toml, up.wharf_args());
    assert!(wharf.log().contains("listening on https://"), "the log does not announce HTTPS");
    let url = format!("https://{}/v2/", addr(&wharf));

    let resp = tls_client(&cert_a, false).get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN should select HTTP/2");
    let resp = tls_client(&cert_a, true).get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    // Plain HTTP on the TLS port gets no registry answer.
    let plain = client().get(format!("http://{}/v2/", addr(&wharf))).send().await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true), "plain HTTP was served on the TLS port");

    // Renewal: new files replace the old ones in place (as cert-manager does); wharf picks them up.
    let (cert_b, key_b) = certificate(dir.path(), "wharf-b");
    for (from, to) in [(&key_b, &key), (&cert_b, &cert)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    let trusts_b = tls_client(&cert_b, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = trusts_b.get(&url).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tls_client(&cert_a, false).get(&url).send().await.is_err(), "the old certificate is still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_idle_and_oversized_requests_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let toml = "[server]\nheader_timeout = 1\nidle_timeout = 4\nmax_header_bytes = 16384\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let bound = Duration::from_secs(20);

    // Slow-loris: a request head that never ends.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: wharf\r\nX-Slow: ").await.unwrap();
    let answer = read_to_close(&mut s, bound).await;
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "unexpected answer: {answer}");

    // An oversized head: 431, and the connection ends.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    let big = format!("GET /v2/ HTTP/1.1\r\nHost: wharf\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    let _ = s.write_all(big.as_bytes()).await;
    let answer = read_to_close(&mut s, bound).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "expected 431, got: {:.80}", answer);

    // Waiting for the next request is not a slow head: a keep-alive connection quiet for longer than
    // header_timeout (but not idle_timeout) still serves its next request.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    for round in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(bound, s.read(&mut buf)).await.expect("an answer").unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "request {round} on a kept-alive connection: {n} bytes");
        // The feature under test is a timeout: only waiting shows it (longer than header_timeout).
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }

    // A keep-alive connection that goes quiet after its request is closed.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut s, bound).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the request itself was not answered: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let wharf = start_with(dir.path(), "[server]\nmax_connections = 2\nheader_timeout = 60\n", up.wharf_args());
    let held: Vec<TcpStream> =
        vec![TcpStream::connect(addr(&wharf)).await.unwrap(), TcpStream::connect(addr(&wharf)).await.unwrap()];
    // The third connection is accepted by the kernel but not served while two are open.
    let mut third = TcpStream::connect(addr(&wharf)).await.unwrap();
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "a connection past the limit was served");
    drop(held);
    let answer = read_to_close(&mut third, Duration::from_secs(20)).await;
    assert!(format!("{}{answer}", byte[0] as char).contains("HTTP/1.1 200"), "never served: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upstream_meets_the_request_deadline() {
    // An upstream that accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = black_hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            open.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let args = ["--upstream", &format!("stall.test=http://{hole}"), "--default-registry", "stall.test"];
    let toml = "[server]\nrequest_timeout = 2\n[upstream]\nread_timeout = 600\n";
    let wharf = start_with(dir.path(), toml, args.iter().map(|s| s.to_string()).collect());
    let started = Instant::now();
    let resp = client().get(format!("{}/v2/team/app/manifests/latest", wharf.url())).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(started.elapsed() < Duration::from_secs(60), "the deadline did not end the request");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_fills_queue_behind_their_limit() {
    let up = FakeUpstream::start().await;
    let (a, a_data) = up.add_random_blob(400_000);
    let (b, b_data) = up.add_random_blob(400_000);
    let gate = up.gate(&a, 100_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start_with(dir.path(), "[server]\nmax_fills = 1\n", up.wharf_args());
    let http = client();
    let (first, _) = spawn_fetch(&http, &format!("{}/v2/x/y/blobs/{a}", wharf.url()), &[]);
    gate.wait_reached().await;
    let (second, mut second_headers) = spawn_fetch(&http, &format!("{}/v2/x/y/blobs/{b}", wharf.url()), &[]);
    // While the only fill slot is busy, the second blob is not fetched and its client is not failed.
    let early = tokio::time::timeout(Duration::from_millis(500), &mut second_headers).await;
    assert!(early.is_err(), "the second request was answered while its fill should be queued");
    assert_eq!(up.blob_gets(&b), 0, "the second fill did not wait for a slot");
    gate.release();
    for (task, want) in [(first, a_data), (second, b_data)] {
        match task.await.unwrap() {
            crate::support::fake_upstream::Outcome::Complete(200, _, body) => assert!(body == want),
            other => panic!("expected the blob, got {other:?}"),
        }
    }
}
