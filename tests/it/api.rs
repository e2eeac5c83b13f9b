//! In-process router tests (axum `oneshot`): error JSON, HEAD headers, 405s, routing, no compression.
//! The upstream here is an address where nothing listens, so only wharf's own answers are exercised.

use axum::body::Body;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use wharf::config::{Config, Overrides};

struct App {
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let overrides = Overrides {
        data_dir: Some(dir.path().to_path_buf()),
        upstreams: vec![("nowhere.test".into(), "http://127.0.0.1:1".into())],
        default_registry: Some("nowhere.test".into()),
        ..Default::default()
    };
    let config = Config::load(None, &overrides).unwrap();
    let state = wharf::state::AppState::open(config, tokio_util::task::TaskTracker::new()).unwrap();
    App { router: wharf::api::router(state), _dir: dir }
}

async fn call(app: &App, method: Method, uri: &str) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let req =
        Request::builder().method(method).uri(uri).header("accept-encoding", "gzip, zstd").body(Body::empty()).unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, parts.headers, json)
}

fn code(json: &serde_json::Value) -> &str {
    json["errors"][0]["code"].as_str().unwrap_or("<no OCI error>")
}

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let app = app();
    let (status, headers, json) = call(&app, Method::GET, "/v2/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json, serde_json::json!({}));
    assert_eq!(headers["docker-distribution-api-version"], "registry/2.0");
    assert!(headers.get("content-encoding").is_none());
}

#[tokio::test]
async fn invalid_input_gets_oci_errors() {
    let app = app();
    let cases = [
        ("/v2/UPPER/manifests/latest", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a/%2e%2e/b/blobs/sha256:00", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/%2e%2e/manifests/latest", StatusCode::BAD_REQUEST, "NAME_INVALID"),
        ("/v2/a/blobs/sha256:abc", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/manifests/.INVALID_MANIFEST_NAME", StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        ("/v2/a/referrers/notadigest", StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ("/v2/a/unknown/endpoint", StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        ("/nothing/here", StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
    ];
    for (uri, status, expected) in cases {
        let (got, headers, json) = call(&app, Method::GET, uri).await;
        assert_eq!((got, code(&json)), (status, expected), "{uri}");
        assert_eq!(headers["content-type"], "application/json", "{uri}");
        assert_eq!(headers["docker-distribution-api-version"], "registry/2.0", "{uri}");
    }
}

#[tokio::test]
async fn push_and_delete_are_unsupported() {
    let app = app();
    for (method, uri) in [
        (Method::POST, "/v2/a/blobs/uploads/".to_string()),
        (Method::POST, "/v2/".to_string()),
        (Method::PATCH, "/v2/a/blobs/uploads/some-uuid".to_string()),
        (Method::PUT, "/v2/a/manifests/latest".to_string()),
        (Method::DELETE, "/v2/a/manifests/latest".to_string()),
        (Method::DELETE, format!("/v2/a/blobs/{DIGEST}")),
        (Method::GET, "/v2/a/blobs/uploads/some-uuid".to_string()),
    ] {
        let (status, _, json) = call(&app, method.clone(), &uri).await;
        assert_eq!((status, code(&json)), (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"), "{method} {uri}");
    }
}

#[tokio::test]
async fn unconfigured_registries_are_never_contacted() {
    let app = app();
    let (status, _, json) = call(&app, Method::GET, "/v2/x/manifests/latest?ns=evil.example").await;
    assert_eq!((status, code(&json)), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
    let (status, _, json) = call(&app, Method::GET, "/v2/x/manifests/latest?ns=evil.example%3A5000").await;
    assert_eq!((status, code(&json)), (StatusCode::NOT_FOUND, "NAME_UNKNOWN"));
}

#[tokio::test]
async fn unreachable_upstream_is_503_so_clients_fall_back() {
    let app = app();
    for (method, uri) in [
        (Method::GET, format!("/v2/a/blobs/{DIGEST}")),
        (Method::HEAD, format!("/v2/a/blobs/{DIGEST}?ns=nowhere.test")),
        (Method::GET, "/v2/nowhere.test/a/manifests/latest".to_string()),
        (Method::HEAD, "/v2/a/manifests/latest".to_string()),
        (Method::GET, "/v2/a/tags/list?n=1".to_string()),
    ] {
        let (status, headers, json) = call(&app, method.clone(), &uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{method} {uri}");
        if method == Method::GET {
            assert_eq!(code(&json), "UNAVAILABLE", "{uri}");
        }
        assert_eq!(headers["docker-distribution-api-version"], "registry/2.0");
    }
}

#[tokio::test]
async fn ns_is_echoed_and_health_endpoints_answer() {
    let app = app();
    let (_, headers, _) = call(&app, Method::GET, "/v2/a/manifests/latest?ns=nowhere.test").await;
    assert_eq!(headers["oci-namespace"], "nowhere.test");
    let (status, _, _) = call(&app, Method::GET, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(&app, Method::GET, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
}
