//! Private content: what wharf could fetch only with its own credentials reaches only clients that prove
//! access to the repository they name, with a client token or with their own upstream credentials; the
//! check is per request path, so a blob cached for a private repository never leaks through a public one.

use crate::support::fake_upstream::{Auth, FakeUpstream, REGISTRY, basic, client};
use crate::support::wharf::Wharf;
use std::path::Path;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Reads `fake.test/team/*`.
const TEAM_TOKEN: &str = "team-token-0123456789abcdef";
/// Reads only `fake.test/elsewhere/*`.
const OTHER_TOKEN: &str = "other-token-0123456789abcdef";
const PRIVATE: &str = "team/app";
const PUBLIC: &str = "pub/app";

/// wharf mirroring `up` with alice's credentials and two client tokens; `answer` is `deny` or `hide`.
fn start(up: &FakeUpstream, dir: &Path, answer: &str) -> Wharf {
    let creds = dir.join("config.json");
    let auth = basic("alice", "s3cret").to_str().unwrap().trim_start_matches("Basic ").to_string();
    std::fs::write(&creds, serde_json::json!({"auths": {REGISTRY: {"auth": auth}}}).to_string()).unwrap();
    let config = dir.join("wharf.toml");
    let toml = format!(
        r#"
[access]
private_answer = "{answer}"
[[access.tokens]]
name = "team"
token = "{TEAM_TOKEN}"
read = ["{REGISTRY}/team/*"]
[[access.tokens]]
name = "other"
token = "{OTHER_TOKEN}"
read = ["{REGISTRY}/elsewhere/*"]
"#
    );
    std::fs::write(&config, toml).unwrap();
    let mut args = up.wharf_args();
    args.extend(["--config", config.to_str().unwrap(), "--credentials", creds.to_str().unwrap()].map(String::from));
    Wharf::start(&dir.join("data"), &args)
}

/// An upstream like Docker Hub: bearer tokens, alice may read everything, anonymous tokens read `pub/app`.
async fn upstream() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.set_auth(Auth::Bearer(Some(("alice".into(), "s3cret".into()))));
    up.set_public_repos(&[PUBLIC]);
    up
}

async fn get(url: &str, auth: Option<&str>) -> reqwest::Response {
    let mut req = client().get(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap()
}

async fn code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.expect("an OCI error body");
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test(flavor = "multi_thread")]
async fn private_content_needs_a_client_token_or_upstream_credentials() {
    let up = upstream().await;
    let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    up.put_manifest(PRIVATE, "v1", OCI_MANIFEST, body.clone());
    let (digest, data) = up.add_random_blob_in(&[PRIVATE], 200_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&up, dir.path(), "deny");
    let manifest = format!("{}/v2/{PRIVATE}/manifests/v1", wharf.url());
    let blob = format!("{}/v2/{PRIVATE}/blobs/{digest}", wharf.url());

    // Anonymous: refused with a challenge that makes Docker and podman offer credentials.
    for url in [&manifest, &blob] {
        let resp = get(url, None).await;
        assert_eq!(resp.status(), 401, "{url}");
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
        assert!(challenge.starts_with("Basic realm="), "{challenge}");
        assert_eq!(code(resp).await, "UNAUTHORIZED");
    }

    // A client token for this repository (containerd's hosts.toml header) reads it.
    let resp = get(&manifest, Some(&bearer(TEAM_TOKEN))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), body.as_bytes());
    let resp = get(&blob, Some(&bearer(TEAM_TOKEN))).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == data, "the blob differs");
    // The same token as a Basic password (Docker and podman credentials for the mirror).
    let as_basic = basic("anyone", TEAM_TOKEN).to_str().unwrap().to_string();
    assert_eq!(get(&blob, Some(&as_basic)).await.status(), 200);
    // A token for other repositories does not, even with the content cached.
    let resp = get(&blob, Some(&bearer(OTHER_TOKEN))).await;
    assert_eq!(resp.status(), 401);

    // The client's own upstream credentials, checked by the upstream (token request with them).
    let alice = basic("alice", "s3cret").to_str().unwrap().to_string();
    let before = up.requests().iter().filter(|r| r.authorization.as_deref() == Some(&alice)).count();
    assert_eq!(get(&blob, Some(&alice)).await.status(), 200);
    let asked = up.requests().iter().filter(|r| r.authorization.as_deref() == Some(&alice)).count();
    assert!(asked > before, "the client's credentials were not checked upstream");
    // The verdict is reused for a while: no second check.
    assert_eq!(get(&manifest, Some(&alice)).await.status(), 200);
    let again = up.requests().iter().filter(|r| r.authorization.as_deref() == Some(&alice)).count();
    assert_eq!(again, asked, "a cached verdict went upstream again");
    // Wrong credentials are refused.
    let wrong = basic("alice", "wrong").to_str().unwrap().to_string();
    assert_eq!(get(&blob, Some(&wrong)).await.status(), 401);

    // wharf's client tokens never travel upstream.
    for r in up.requests() {
        let a = r.authorization.unwrap_or_default();
        assert!(!a.contains(TEAM_TOKEN) && !a.contains(OTHER_TOKEN), "a client token reached the upstream: {a}");
    }
    let tokened = basic("anyone", TEAM_TOKEN).to_str().unwrap().to_string();
    assert!(up.requests().iter().all(|r| r.authorization.as_deref() != Some(&tokened)));
}

#[tokio::test(flavor = "multi_thread")]
async fn hide_answers_not_found() {
    let up = upstream().await;
    let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[]}}"#);
    up.put_manifest(PRIVATE, "v1", OCI_MANIFEST, body);
    let (digest, _) = up.add_random_blob_in(&[PRIVATE], 10_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&up, dir.path(), "hide");
    let resp = get(&format!("{}/v2/{PRIVATE}/manifests/v1", wharf.url()), None).await;
    assert_eq!(resp.status(), 404);
    assert!(!resp.headers().contains_key("www-authenticate"));
    assert_eq!(code(resp).await, "MANIFEST_UNKNOWN");
    let blob = format!("{}/v2/{PRIVATE}/blobs/{digest}", wharf.url());
    let resp = get(&blob, None).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(code(resp).await, "BLOB_UNKNOWN");
    assert_eq!(get(&blob, Some(&bearer(TEAM_TOKEN))).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_check_is_per_repository_not_per_digest() {
    let up = upstream().await;
    let (shared, shared_data) = up.add_random_blob_in(&[PUBLIC, PRIVATE], 50_000);
    let (secret, secret_data) = up.add_random_blob_in(&[PRIVATE], 50_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = start(&up, dir.path(), "deny");
    let url = |repo: &str, d: &str| format!("{}/v2/{repo}/blobs/{d}", wharf.url());

    // A public repository of a credentialed registry is open to anyone.
    let resp = get(&url(PUBLIC, &shared), None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == shared_data);

    // Cache the private blob through the private repository.
    let resp = get(&url(PRIVATE, &secret), Some(&bearer(TEAM_TOKEN))).await;
    assert!(resp.bytes().await.unwrap() == secret_data);

    // Asking for it through the public repository finds nothing, although the cache holds it.
    let resp = get(&url(PUBLIC, &secret), None).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(code(resp).await, "BLOB_UNKNOWN");
    // The shared blob, cached, is still refused through the private repository without proof…
    assert_eq!(get(&url(PRIVATE, &shared), None).await.status(), 401);
    // …and served through it with proof.
    let resp = get(&url(PRIVATE, &shared), Some(&bearer(TEAM_TOKEN))).await;
    assert!(resp.bytes().await.unwrap() == shared_data);

    // `/v2/` challenges clients without credentials (Docker only sends them after a challenge there).
    let base = format!("{}/v2/", wharf.url());
    let resp = get(&base, None).await;
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_eq!(get(&base, Some(&bearer(TEAM_TOKEN))).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_private_without_credentials() {
    let up = FakeUpstream::start().await;
    let (digest, data) = up.add_random_blob(10_000);
    let dir = tempfile::tempdir().unwrap();
    let wharf = Wharf::start(dir.path(), &up.wharf_args());
    assert_eq!(get(&format!("{}/v2/", wharf.url()), None).await.status(), 200);
    let resp = get(&format!("{}/v2/any/repo/blobs/{digest}", wharf.url()), None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == data);
}

/// The real thing: a docker-registry with htpasswd auth (every repository private) behind wharf, pulled
/// with skopeo, which offers its credentials after wharf's `/v2/` challenge as Docker and podman do.
#[test]
fn skopeo_pulls_a_private_image_only_with_credentials() {
    use crate::support::images::{run, run_ok, sha256, skopeo};
    use crate::support::registry::{Registry, shared};
    let seeded = shared();
    let image = seeded.image("test/multi");
    let private = Registry::start_private(seeded.registry.root(), "alice", "pw");
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("config.json");
    let auth = basic("alice", "pw").to_str().unwrap().trim_start_matches("Basic ").to_string();
    std::fs::write(&creds, serde_json::json!({"auths": {"private.test": {"auth": auth}}}).to_string()).unwrap();
    let config = dir.path().join("wharf.toml");
    let toml =
        format!("[[access.tokens]]\nname = \"ci\"\ntoken = \"{TEAM_TOKEN}\"\nread = [\"private.test/test/*\"]\n");
    std::fs::write(&config, toml).unwrap();
    let args = ["--upstream", &format!("private.test={}", private.url()), "--credentials", creds.to_str().unwrap()];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--config".into(), config.to_str().unwrap().into()]);
    let wharf = Wharf::start(&dir.path().join("data"), &args);
    let source = format!("docker://{}/private.test/{}", wharf.addr, image.reference());
    let inspect = |creds: Option<&str>| {
        let mut cmd = skopeo();
        cmd.args(["inspect", "--raw", "--tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--creds", c]);
        }
        cmd.arg(&source);
        cmd
    };
    let timeout = std::time::Duration::from_secs(120);

    let refused = run(&mut inspect(None), timeout);
    assert!(!refused.status.success(), "an anonymous client read a private image");
    let wrong = run(&mut inspect(Some("alice:wrong")), timeout);
    assert!(!wrong.status.success(), "wrong upstream credentials were accepted");
    // Her own upstream credentials, which wharf checks with the registry.
    let raw = run_ok(&mut inspect(Some("alice:pw")), timeout);
    assert_eq!(sha256(&raw.stdout), image.manifest_digest);
    // A wharf client token as the password, with the whole image copied.
    let out = dir.path().join("layout");
    let mut copy = skopeo();
    copy.args(["copy", "--all", "--src-tls-verify=false", "--dest-oci-accept-uncompressed-layers"]);
    copy.args(["--src-creds", &format!("ci:{TEAM_TOKEN}")]);
    run_ok(copy.arg(&source).arg(format!("oci:{}:{}", out.display(), image.tag)), timeout);
    crate::skopeo::check_layout(&out, image, &source);
}
