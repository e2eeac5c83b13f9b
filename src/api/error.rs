//! The one place errors become HTTP: OCI error JSON `{"errors":[{"code","message","detail"}]}` with the right status.

use crate::{cache, oci, upstream};
use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use std::sync::Arc;

/// OCI error codes (distribution-spec "Error Codes") plus `UNAVAILABLE` and `UNKNOWN` as distribution uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OciCode {
    /// 404: blob unknown to registry.
    BlobUnknown,
    /// 400: provided digest did not match uploaded content.
    DigestInvalid,
    /// 404: manifest unknown to registry.
    ManifestUnknown,
    /// 400: invalid repository name.
    NameInvalid,
    /// 404: repository name not known to registry.
    NameUnknown,
    /// 401: authentication required.
    Unauthorized,
    /// 403: requested access to the resource is denied.
    Denied,
    /// 405: the operation is unsupported.
    Unsupported,
    /// 503: the upstream is unavailable (so clients fall back to the next host).
    Unavailable,
    /// 500: unknown error.
    Unknown,
    /// 416: the range cannot be satisfied.
    RangeInvalid,
}

impl OciCode {
    /// `{code, status, message}`.
    pub fn describe(self) -> (&'static str, StatusCode, &'static str) {
        use OciCode::*;
        match self {
            BlobUnknown => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND, "blob unknown to registry"),
            DigestInvalid => ("DIGEST_INVALID", StatusCode::BAD_REQUEST, "provided digest is invalid"),
            ManifestUnknown => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND, "manifest unknown"),
            NameInvalid => ("NAME_INVALID", StatusCode::BAD_REQUEST, "invalid repository name"),
            NameUnknown => ("NAME_UNKNOWN", StatusCode::NOT_FOUND, "repository name not known to registry"),
            Unauthorized => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED, "authentication required"),
            Denied => ("DENIED", StatusCode::FORBIDDEN, "requested access to the resource is denied"),
            Unsupported => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED, "the operation is unsupported"),
            Unavailable => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE, "upstream registry unavailable"),
            Unknown => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR, "unknown error"),
            RangeInvalid => ("RANGE_INVALID", StatusCode::RANGE_NOT_SATISFIABLE, "requested range not satisfiable"),
        }
    }
}

/// What a request is about, which decides the "not found" code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// A blob.
    Blob,
    /// A manifest.
    Manifest,
    /// A repository (tags/list, referrers).
    Repository,
}

/// An API error: a code, a detail for the client, and the underlying cause for the log.
#[derive(Debug)]
pub struct Error {
    /// The OCI code.
    pub code: OciCode,
    /// Shown to the client as `detail`; never contains secrets.
    pub detail: String,
    /// For 416: the blob size, sent as `Content-Range: bytes */size`.
    pub range_size: Option<u64>,
}

impl Error {
    /// An error with a detail message.
    pub fn new(code: OciCode, detail: impl Into<String>) -> Self {
        Error { code, detail: detail.into(), range_size: None }
    }

    /// 416 for a blob of `size` bytes.
    pub fn unsatisfiable(size: u64) -> Self {
        Error { code: OciCode::RangeInvalid, detail: format!("blob size is {size}"), range_size: Some(size) }
    }

    /// Maps an upstream failure for `subject`.
    pub fn upstream(e: &upstream::Error, subject: Subject) -> Self {
        use upstream::Error as U;
        let code = match e {
            U::NotFound => match subject {
                Subject::Blob => OciCode::BlobUnknown,
                Subject::Manifest => OciCode::ManifestUnknown,
                Subject::Repository => OciCode::NameUnknown,
            },
            U::Unauthorized => OciCode::Unauthorized,
            U::Denied => OciCode::Denied,
            U::RateLimited | U::Transport(_) | U::Protocol(_) | U::Status(_) => OciCode::Unavailable,
        };
        // Upstream errors carry no URLs (see `upstream::Error`), so their causes are safe to show.
        Error::new(code, crate::telemetry::chain(e))
    }

    /// Maps a cache failure for `subject`.
    pub fn cache(e: &cache::Error, subject: Subject) -> Self {
        match e {
            cache::Error::Upstream(u) => Error::upstream(u, subject),
            // The upstream served bad content: the client should try another host.
            cache::Error::DigestMismatch { .. } | cache::Error::SizeMismatch { .. } => {
                Error::new(OciCode::Unavailable, e.to_string())
            }
            // Its request was cancelled or its task failed: a retry starts a new fill.
            cache::Error::Abandoned => Error::new(OciCode::Unavailable, e.to_string()),
            // A peer asked this node for a blob it is itself fetching from a peer: the asker falls back.
            cache::Error::ViaPeer => Error::new(OciCode::Unavailable, e.to_string()),
            cache::Error::Io(_) | cache::Error::Meta(_) | cache::Error::Task(_) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(e), "internal error");
                Error::new(OciCode::Unknown, "internal error")
            }
        }
    }
}

impl From<oci::ParseError> for Error {
    fn from(e: oci::ParseError) -> Self {
        let code = match e.kind {
            oci::ParseKind::Name => OciCode::NameInvalid,
            oci::ParseKind::Digest => OciCode::DigestInvalid,
            // Conformance: a bad tag is an unknown manifest (404), as distribution answers.
            oci::ParseKind::Tag => OciCode::ManifestUnknown,
        };
        Error::new(code, e.to_string())
    }
}

impl From<upstream::RouteError> for Error {
    fn from(e: upstream::RouteError) -> Self {
        match e {
            upstream::RouteError::UnknownRegistry(_) | upstream::RouteError::ForeignName(_) => {
                Error::new(OciCode::NameUnknown, e.to_string())
            }
            upstream::RouteError::Name(p) => p.into(),
        }
    }
}

/// Attached to error responses so the request log can show the cause.
#[derive(Debug, Clone)]
pub struct ErrorNote(pub Arc<String>);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (code, status, message) = self.code.describe();
        let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": self.detail}]});
        let mut resp = (status, Json(body)).into_response();
        if let Some(size) = self.range_size
            && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        if self.code == OciCode::Unauthorized {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"wharf\""));
        }
        resp.extensions_mut().insert(ErrorNote(Arc::new(self.detail)));
        resp
    }
}
