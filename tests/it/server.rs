//! The listener: TLS with reload, HTTP/2 and HTTP/1.1, slow-loris heads and handshakes cut off, oversized
//! heads refused, idle connections closed, the connection limit queues, a stalled upstream meets the request
//! deadline, and upstream fills queue behind their limit. Each limit's test keeps the other limits far away
//! and bounds when the effect happens (generous bounds, well clear of the other limits), so it fails
//! without that one limit.

use crate::support::fake_upstream::{FakeUpstream, client, spawn_fetch};
use crate::support::wharf::Wharf;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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

/// Waits for the server to close `stream` and asserts it did so between `lo` and `hi` after `since`, which is
/// taken before the server's clock for the limit under test can start: the effect of that one limit, not of
/// another one (set far away) nor of an early error. Panics naming `what`.
async fn assert_closed_between<S: AsyncRead + Unpin>(
    stream: &mut S,
    since: Instant,
    lo: Duration,
    hi: Duration,
    what: &str,
) {
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut rest)).await;
    let after = since.elapsed();
    assert!(closed.is_ok(), "{what}: still open after {after:?}");
    assert!(after >= lo, "{what}: closed after {after:?}, before {lo:?}");
    assert!(after < hi, "{what}: closed after {after:?}, not by the limit under test (well before {hi:?})");
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

/// A request head that never ends, sent one byte every 200 ms over `stream` until the server closes the
/// connection: (time from `since` to the close, what the server sent), or an error naming how long the
/// connection stayed open when that is `limit`. `since` is taken before the server can start its clock: before
/// the connect for a connection's first head, before the first byte for a later one.
async fn trickle_head<S>(stream: S, since: Instant, limit: Duration) -> Result<(Duration, String), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let head = b"GET /v2/ HTTP/1.1\r\nHost: wharf\r\nX-Slow: ";
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let (mut sent, mut answer, mut buf) = (0usize, Vec::new(), [0u8; 1024]);
    let first = since;
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Ok((first.elapsed(), String::from_utf8_lossy(&answer).into_owned())),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                let byte = head.get(sent).copied().unwrap_or(b'a');
                sent += 1;
                if wr.write_all(&[byte]).await.and(wr.flush().await).is_err() {
                    // Reset by the server: it closed the connection.
                    return Ok((first.elapsed(), String::from_utf8_lossy(&answer).into_owned()));
                }
            }
            () = tokio::time::sleep_until((first + limit).into()) => {
                return Err(format!("a slow head was still open after {limit:?} ({sent} bytes sent)"));
            }
        }
    }
}

/// Reads one response head (up to the blank line); panics if the server closes first or after `limit`.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                other => {
                    panic!("connection ended before a response head ({other:?}): {:?}", String::from_utf8_lossy(&head))
                }
            }
        }
    };
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| panic!("no response head within {limit:?}"));
    String::from_utf8(head).unwrap()
}

fn content_length(head: &str) -> usize {
    let line = head.lines().find(|l| l.to_ascii_lowercase().starts_with("content-length:")).expect("a Content-Length");
    line.split(':').nth(1).unwrap().trim().parse().unwrap()
}

/// Raises this process's open-file limit to at least `want` (wharf, started afterwards, inherits it).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for the calls to read and write.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < want as libc::rlim_t {
        lim.rlim_cur = lim.rlim_max.min(want as libc::rlim_t);
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
    assert!(lim.rlim_cur >= want as libc::rlim_t, "open-file limit {} below the {want} this test needs", lim.rlim_cur);
}

const SLOW_HEAD: &str = "[server]\nheader_timeout = 1\nidle_timeout = 60\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_head_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // idle_timeout far away: only the head deadline can end this connection within the bound.
    let wharf = start_with(dir.path(), SLOW_HEAD, up.wharf_args());
    let opened = Instant::now();
    let stream = TcpStream::connect(addr(&wharf)).await.unwrap();
    let (after, answer) = trickle_head(stream, opened, Duration::from_secs(15)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "unexpected answer: {answer}");
    assert!(after >= Duration::from_millis(950), "closed after {after:?}, before header_timeout");
    assert!(after < Duration::from_secs(8), "closed after {after:?}: not by header_timeout (1 s)");

    // The next head on a kept-alive connection: its clock starts at its first byte, after a wait longer
    // than header_timeout that does not count against it.
    slow_head_after_a_kept_alive_wait(TcpStream::connect(addr(&wharf)).await.unwrap()).await;
}

/// One whole request on `s`, a keep-alive wait longer than header_timeout (1 s), then a trickled head: it must
/// be cut at header_timeout counted from its first byte, the wait not counted against it.
async fn slow_head_after_a_kept_alive_wait<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    let head = read_head(&mut s, Duration::from_secs(10)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the first request: {head}");
    let mut body = vec![0u8; content_length(&head)];
    s.read_exact(&mut body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (after, _) = trickle_head(s, Instant::now(), Duration::from_secs(15)).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(after >= Duration::from_millis(950), "kept alive: closed after {after:?}, before header_timeout");
    assert!(after < Duration::from_secs(8), "kept alive: closed after {after:?}: not by header_timeout (1 s)");
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_slow_heads_are_each_cut_while_others_are_served() {
    const SLOW: usize = 300;
    raise_fd_limit(4 * SLOW as u64 + 256);
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let wharf = start_with(dir.path(), SLOW_HEAD, up.wharf_args());
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW {
        let addr = addr(&wharf);
        slow.spawn(async move {
            let opened = Instant::now();
            let stream = TcpStream::connect(addr).await.unwrap();
            trickle_head(stream, opened, Duration::from_secs(20)).await
        });
    }
    // Meanwhile new connections keep being answered: one request per connection, back to back.
    let fresh = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    let (mut probes, mut slowest_probe) = (0, Duration::ZERO);
    let mut closes = Vec::new();
    while !slow.is_empty() {
        let t = Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(10), fresh.get(format!("{}/v2/", wharf.url())).send())
            .await
            .expect("GET /v2/ not answered within 10 s")
            .unwrap();
        assert_eq!(resp.status(), 200);
        slowest_probe = slowest_probe.max(t.elapsed());
        probes += 1;
        // Paced, so the probes do not pile up thousands of sockets in TIME_WAIT.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(done) = slow.try_join_next() {
            let (after, answer) = done.unwrap().unwrap_or_else(|e| panic!("{e}"));
            assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "unexpected answer: {answer}");
            closes.push(after);
        }
    }
    let (earliest, latest) = (closes.iter().min().copied().unwrap(), closes.iter().max().copied().unwrap());
    eprintln!("{SLOW} slow heads closed after {earliest:?} to {latest:?}; {probes} probes, slowest {slowest_probe:?}");
    assert_eq!(closes.len(), SLOW);
    // Not closed for some other reason (a refused or reset connection would end sooner).
    assert!(earliest >= Duration::from_millis(950), "a slow head was closed after {earliest:?}, before header_timeout");
    assert!(latest < Duration::from_secs(8), "a slow head was closed only after {latest:?} (header_timeout 1 s)");
    assert!(slowest_probe < Duration::from_secs(3), "GET /v2/ took {slowest_probe:?} among the slow heads");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_head_over_tls_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "wharf");
    let toml = format!("{SLOW_HEAD}tls_cert = {cert:?}\ntls_key = {key:?}\n");
    let up = FakeUpstream::start().await;
    let wharf = start_with(dir.path(), &toml, up.wharf_args());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr(&wharf)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    // The trickled head is the next one on a kept-alive connection (the handshake's clock is long over).
    slow_head_after_a_kept_alive_wait(tls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_tls_handshake_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "wharf");
    let toml = format!("{SLOW_HEAD}tls_cert = {cert:?}\ntls_key = {key:?}\n");
    let up = FakeUpstream::start().await;
    let wharf = start_with(dir.path(), &toml, up.wharf_args());
    // Half a ClientHello: a handshake record announcing 512 bytes, of which a few arrive.
    let half_hello: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0, 0, 0, 0];
    for (case, sent) in [("nothing sent", &[][..]), ("half a ClientHello", half_hello)] {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
        s.write_all(sent).await.unwrap();
        let what = format!("a TLS handshake with {case} (header_timeout 1 s)");
        assert_closed_between(&mut s, start, Duration::from_millis(950), Duration::from_secs(8), &what).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_http1_head_gets_431() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let toml = "[server]\nheader_timeout = 60\nidle_timeout = 60\nmax_header_bytes = 16384\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let limit = Duration::from_secs(10);
    // Just under the limit: served.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    let fits = format!("GET /v2/ HTTP/1.1\r\nHost: wharf\r\nX-Big: {}\r\n\r\n", "a".repeat(12_000));
    s.write_all(fits.as_bytes()).await.unwrap();
    let head = read_head(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "a head under the limit was refused: {head}");

    let s = TcpStream::connect(addr(&wharf)).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let big = format!("GET /v2/ HTTP/1.1\r\nHost: wharf\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    // Written alongside the read: the server answers before it has read everything. The write half is kept
    // (dropping it would end the request stream early).
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(big.as_bytes()).await;
        wr
    });
    let start = Instant::now();
    let head = read_head(&mut rd, limit).await;
    assert!(head.starts_with("HTTP/1.1 431"), "expected 431, got: {head}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(limit, rd.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection stayed open after the 431");
    assert!(start.elapsed() < limit);
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_http2_header_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    let toml = "[server]\nheader_timeout = 60\nidle_timeout = 60\nmax_header_bytes = 4096\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().timeout(Duration::from_secs(10));
    let h2 = h2.build().unwrap();
    let url = format!("{}/v2/", wharf.url());
    let resp = h2.get(&url).send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, reqwest::Version::HTTP_2));
    // 6 KiB: over the configured 4 KiB, under hyper's own default (16 KiB).
    let resp = h2.get(&url).header("x-big", "a".repeat(6 * 1024)).send().await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 431, "an oversized HTTP/2 header list was served"),
        // The client may refuse to send what the server's SETTINGS rule out.
        Err(e) => assert!(!e.is_timeout(), "no answer: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_between_requests_or_for_a_response_is_not_a_slow_head() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(400_000);
    let gate = up.gate(&digest, 100_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start_with(dir.path(), SLOW_HEAD, up.wharf_args());
    let limit = Duration::from_secs(10);

    // A keep-alive connection quiet for longer than header_timeout (but not idle_timeout) still serves its
    // next request. Only waiting shows it.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    for round in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
        let head = read_head(&mut s, limit).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {round} on a kept-alive connection: {head}");
        let mut body = vec![0u8; content_length(&head)];
        s.read_exact(&mut body).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }

    // A request sent (pipelined) while a slow response is still going out is not a slow head either.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    s.write_all(format!("GET /v2/x/y/blobs/{digest} HTTP/1.1\r\nHost: wharf\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_head(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "blob: {head}");
    gate.wait_reached().await;
    let mut body = vec![0u8; content_length(&head)];
    s.read_exact(&mut body[..1]).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    gate.release();
    let rest = tokio::time::timeout(limit, s.read_exact(&mut body[1..])).await.expect("the blob body");
    rest.unwrap_or_else(|e| panic!("the connection ended during the blob body: {e}"));
    assert!(body == data, "wrong blob bytes");
    let head = read_head(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the pipelined request: {head}");
    let mut body = vec![0u8; content_length(&head)];
    s.read_exact(&mut body).await.unwrap();
    // The bytes that came early were the pipelined request's, which was answered: they must not leave a head
    // clock running on the now quiet connection.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    let head = read_head(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "a request after the pipelined one: {head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_connection_is_closed_at_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // header_timeout far away: only the idle timeout can end these connections within the bound.
    let toml = "[server]\nheader_timeout = 60\nidle_timeout = 2\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let limit = Duration::from_secs(15);

    let (lo, hi) = (Duration::from_millis(1900), Duration::from_secs(8));

    // After an answered request: the idle clock starts no earlier than the request was sent.
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    let sent = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    let head = read_head(&mut s, limit).await;
    assert!(head.starts_with("HTTP/1.1 200"), "the request itself was not answered: {head}");
    assert_closed_between(&mut s, sent, lo, hi, "a quiet keep-alive connection (idle_timeout 2 s)").await;

    // A connection that never sends anything.
    let opened = Instant::now();
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    assert_closed_between(&mut s, opened, lo, hi, "a silent connection (idle_timeout 2 s)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_sends_nothing_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // idle_timeout far away: a silent new connection is waiting for its first request head, not idle.
    let toml = "[server]\nheader_timeout = 1\nidle_timeout = 60\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let opened = Instant::now();
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    let (lo, hi) = (Duration::from_millis(950), Duration::from_secs(8));
    assert_closed_between(&mut s, opened, lo, hi, "a silent connection (header_timeout 1 s)").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_limit_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // The held connections send nothing: only the limit (not a timeout) keeps the third one waiting.
    let toml = "[server]\nmax_connections = 2\nheader_timeout = 60\nidle_timeout = 60\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let held: Vec<TcpStream> =
        vec![TcpStream::connect(addr(&wharf)).await.unwrap(), TcpStream::connect(addr(&wharf)).await.unwrap()];
    // The third connection is accepted by the kernel but not served while two are open.
    let mut third = TcpStream::connect(addr(&wharf)).await.unwrap();
    third.write_all(b"GET /healthz HTTP/1.1\r\nHost: wharf\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(2), third.read(&mut byte)).await;
    assert!(early.is_err(), "a connection past the limit was served");
    drop(held);
    let freed = Instant::now();
    let answer = read_to_close(&mut third, Duration::from_secs(20)).await;
    assert!(format!("{}{answer}", byte[0] as char).contains("HTTP/1.1 200"), "never served: {answer}");
    let after = freed.elapsed();
    assert!(after < Duration::from_secs(5), "served {after:?} after a slot was freed");
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
    // Every other bound is far away: the upstream's read timeout and the connection's idle timeout.
    let toml = "[server]\nrequest_timeout = 2\nidle_timeout = 600\n[upstream]\nread_timeout = 600\n";
    let wharf = start_with(dir.path(), toml, args.iter().map(|s| s.to_string()).collect());
    let started = Instant::now();
    let get = client().get(format!("{}/v2/team/app/manifests/latest", wharf.url())).send();
    let resp = tokio::time::timeout(Duration::from_secs(20), get).await;
    let after = started.elapsed();
    let resp = resp.unwrap_or_else(|_| panic!("no answer after {after:?}: the request deadline (2 s) did not fire"));
    assert_eq!(resp.as_ref().map(|r| r.status()).ok(), Some(reqwest::StatusCode::SERVICE_UNAVAILABLE));
    let v: serde_json::Value = resp.unwrap().json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
    assert!(after >= Duration::from_millis(1900), "answered after {after:?}, before the request deadline");
    assert!(after < Duration::from_secs(10), "answered after {after:?}: not by the request deadline (2 s)");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_fills_queue_behind_their_limit() {
    let up = FakeUpstream::start().await;
    let (a, a_data) = up.add_random_blob(400_000);
    let (b, b_data) = up.add_random_blob(400_000);
    let gate = up.gate(&a, 100_000);
    let dir = tempfile::tempdir().unwrap();
    let toml = "[server]\nmax_fills = 1\nrequest_timeout = 120\n";
    let wharf = start_with(dir.path(), toml, up.wharf_args());
    let http = client();
    let (first, _) = spawn_fetch(&http, &format!("{}/v2/x/y/blobs/{a}", wharf.url()), &[]);
    gate.wait_reached().await;
    let (second, mut second_headers) = spawn_fetch(&http, &format!("{}/v2/x/y/blobs/{b}", wharf.url()), &[]);
    // While the only fill slot is busy, the second blob is not fetched and its client is not failed.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut second_headers).await;
    assert!(early.is_err(), "the second request was answered while its fill should be queued");
    assert_eq!(up.blob_gets(&b), 0, "the second fill did not wait for a slot");
    gate.release();
    let released = Instant::now();
    let headers = tokio::time::timeout(Duration::from_secs(20), second_headers).await;
    let after = released.elapsed();
    assert!(matches!(headers, Ok(Ok((200, _)))), "the queued request: {headers:?}");
    assert!(after < Duration::from_secs(10), "the queued fill started {after:?} after the slot was freed");
    for (task, want) in [(first, a_data), (second, b_data)] {
        match task.await.unwrap() {
            crate::support::fake_upstream::Outcome::Complete(200, _, body) => assert!(body == want),
            other => panic!("expected the blob, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_open_files_limit_is_raised_so_more_connections_than_the_soft_limit_are_served() {
    use std::os::unix::process::CommandExt;
    const SOFT: u64 = 256;
    const HARD: u64 = 4096;
    const CONNECTIONS: usize = 600;
    let tmp = tempfile::tempdir().unwrap();
    let wharf = Wharf::start_configured("127.0.0.1:0", &tmp.path().join("data"), &[], |cmd| {
        // SAFETY: only async-signal-safe work (one setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit { rlim_cur: SOFT, rlim_max: HARD };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let line = wharf.log().lines().find(|l| l.contains("open files limit")).map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("no open files line:\n{}", wharf.log()));
    assert!(line.contains(&format!("before={SOFT}")) && line.contains(&format!("soft={HARD}")), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", wharf.pid())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    assert_eq!(open_files.split_whitespace().nth(3), Some(HARD.to_string().as_str()), "{open_files}");

    // More connections than the old soft limit, all open at once, each answered.
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(TcpStream::connect(wharf.addr).await.unwrap());
    }
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut answered = 0;
        for conn in &mut conns {
            conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
        }
        for conn in &mut conns {
            let mut head = [0u8; 12];
            conn.read_exact(&mut head).await.unwrap();
            if &head == b"HTTP/1.1 200" {
                answered += 1;
            }
        }
        answered
    })
    .await;
    assert_eq!(answered, Ok(CONNECTIONS), "connections past the soft limit of {SOFT} were not answered");
}

/// Sends `GET /v2/` on `s` and reads the answer (`{}`, 2 bytes); returns the status line.
async fn get_base(s: &mut TcpStream) -> String {
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: wharf\r\n\r\n").await.unwrap();
    let head = read_head(s, Duration::from_secs(15)).await;
    let mut body = [0u8; 2];
    s.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap_or_default().to_owned()
}

/// Waits until wharf has logged its `n`th parked connection.
async fn wait_parked(wharf: &Wharf, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while wharf.log().matches("idle connection parked").count() < n {
        assert!(Instant::now() < deadline, "no connection parked:\n{}", wharf.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_parked_and_answers_its_next_requests() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // Both timeouts far away: only parking happens to these connections.
    let wharf = start_with(dir.path(), "[server]\nheader_timeout = 60\nidle_timeout = 60\n", up.wharf_args());
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK");
    wait_parked(&wharf, 1).await;
    // The same connection, parked, takes requests again, and parks again when idle.
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK");
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK");
    wait_parked(&wharf, 2).await;
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_trickled_into_a_parked_connection_is_cut_at_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // idle_timeout far away: the connection is waiting for the rest of a request head, not idle.
    let wharf = start_with(dir.path(), "[server]\nheader_timeout = 1\nidle_timeout = 60\n", up.wharf_args());
    let mut s = TcpStream::connect(addr(&wharf)).await.unwrap();
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK");
    wait_parked(&wharf, 1).await;
    let sent = Instant::now();
    s.write_all(b"GET /v2/ HTTP/1.1\r\n").await.unwrap();
    let (lo, hi) = (Duration::from_millis(950), Duration::from_secs(8));
    assert_closed_between(&mut s, sent, lo, hi, "a head trickled into a parked connection (header_timeout 1 s)").await;
}

/// Connects with a small receive buffer, so that a response of a few MiB fills the socket while the client
/// does not read.
async fn small_window(wharf: &Wharf) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(wharf.addr).await.unwrap()
}

/// Reads a response head and then exactly `len` body bytes; returns the head and the body.
async fn read_response(s: &mut TcpStream, len: usize) -> (String, Vec<u8>) {
    let head = read_head(s, Duration::from_secs(15)).await;
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut body))
        .await
        .expect("the body did not arrive in time")
        .unwrap_or_else(|e| panic!("the body broke off: {e} (head {head:?})"));
    (head, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_gets_the_whole_body_when_it_reads_again() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start().await;
    // Both timeouts far away: the stall below is longer than the parking delay, nothing else.
    let wharf = start_with(dir.path(), "[server]\nheader_timeout = 60\nidle_timeout = 60\n", up.wharf_args());
    let (digest, data) = up.add_random_blob(24 << 20);
    let url = format!("{}/v2/test/app/blobs/{digest}", wharf.url());
    let warm = client().get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(warm.len(), data.len(), "the blob was not cached whole");
    let request = |close: bool| {
        let extra = if close { "Connection: close\r\n" } else { "" };
        format!("GET /v2/test/app/blobs/{digest} HTTP/1.1\r\nHost: wharf\r\n{extra}\r\n")
    };

    // Keep-alive: the socket fills, the client pauses longer than the parking delay, then reads on; the
    // connection must neither park with bytes unsent nor lose them, and takes a request after.
    let mut s = small_window(&wharf).await;
    s.write_all(request(false).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (head, body) = read_response(&mut s, data.len()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body == data, "the body's bytes differ");
    assert_eq!(get_base(&mut s).await, "HTTP/1.1 200 OK", "the connection did not take the next request");

    // Connection: close: the whole body, then the close.
    let mut s = small_window(&wharf).await;
    s.write_all(request(true).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (head, body) = read_response(&mut s, data.len()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body == data, "the body's bytes differ");
    let rest = read_to_close(&mut s, Duration::from_secs(15)).await;
    assert!(rest.is_empty(), "bytes after the body: {rest:?}");
}
