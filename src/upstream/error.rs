//! What can go wrong talking to an upstream registry, classified by what the client should do next.

/// An upstream failure. `api` decides the status code; the variants say what happened, not how to answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream says the manifest, blob or repository does not exist (404).
    #[error("not found upstream")]
    NotFound,
    /// The upstream wants credentials wharf does not have, or refused them (401).
    #[error("upstream requires authentication")]
    Unauthorized,
    /// The upstream refused access (403).
    #[error("upstream denied access")]
    Denied,
    /// The upstream is rate-limiting (429).
    #[error("upstream rate limit reached")]
    RateLimited,
    /// An unexpected status (5xx and anything not handled above).
    #[error("upstream answered {0}")]
    Status(http::StatusCode),
    /// Connect, TLS, timeout or read failure.
    #[error("upstream transport error")]
    Transport(#[source] reqwest::Error),
    /// The upstream broke the protocol (bad redirect, oversized manifest, bad token response…).
    #[error("upstream protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// True when a client should fall back or retry later (and a stale cached answer may be used instead).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::RateLimited | Error::Transport(_) | Error::Protocol(_) => true,
            Error::Status(s) => s.is_server_error() || *s == http::StatusCode::REQUEST_TIMEOUT,
            Error::NotFound | Error::Unauthorized | Error::Denied => false,
        }
    }

    /// This error for another caller that waited on the same shared request: the same variant, except that a
    /// transport error (whose cause cannot be copied) becomes a protocol error carrying its causes as text.
    pub fn copy(&self) -> Error {
        match self {
            Error::NotFound => Error::NotFound,
            Error::Unauthorized => Error::Unauthorized,
            Error::Denied => Error::Denied,
            Error::RateLimited => Error::RateLimited,
            Error::Status(s) => Error::Status(*s),
            Error::Protocol(m) => Error::Protocol(m.clone()),
            Error::Transport(e) => {
                let mut text = self.to_string();
                let mut cause: Option<&dyn std::error::Error> = Some(e);
                while let Some(c) = cause {
                    text.push_str(": ");
                    text.push_str(&c.to_string());
                    cause = c.source();
                }
                Error::Protocol(text)
            }
        }
    }

    /// Classifies a non-success status.
    pub fn from_status(status: http::StatusCode) -> Error {
        match status.as_u16() {
            404 => Error::NotFound,
            401 => Error::Unauthorized,
            403 => Error::Denied,
            429 => Error::RateLimited,
            _ => Error::Status(status),
        }
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        // The URL can carry a signed CDN query string; never let it reach logs.
        Error::Transport(e.without_url())
    }
}
