//! `WWW-Authenticate` challenges (RFC 9110 §11.6.1, RFC 6750 §3) and the token cache.
//! Tokens are keyed by (host, scope) so one repository's token is never used for another, or on another host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One parsed challenge: the scheme (lowercased) and its parameters (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer`, `basic`, …
    pub scheme: String,
    /// `realm`, `service`, `scope`, …
    pub params: HashMap<String, String>,
}

/// Parses every challenge in a `WWW-Authenticate` value; malformed parts end parsing instead of failing.
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut p = Parser { s: value.as_bytes(), i: 0 };
    loop {
        p.skip_ws_commas();
        let Some(word) = p.token() else { break };
        p.skip_ws();
        if p.peek() == Some(b'=') && !out.is_empty() {
            // A parameter of the current challenge.
            p.i += 1;
            p.skip_ws();
            let Some(value) = p.value() else { break };
            out.last_mut().unwrap().params.insert(word.to_ascii_lowercase(), value);
        } else {
            out.push(Challenge { scheme: word.to_ascii_lowercase(), params: HashMap::new() });
        }
    }
    out
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn skip_ws_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c) {
                self.i += 1;
            } else {
                break;
            }
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn value(&mut self) -> Option<String> {
        if self.peek() != Some(b'"') {
            // Unquoted: be lenient (some servers send bare URLs) and read to the next separator.
            let start = self.i;
            while !matches!(self.peek(), None | Some(b',' | b' ' | b'\t')) {
                self.i += 1;
            }
            return (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned());
        }
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => return Some(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        None
    }
}

/// A bearer token response (distribution `docs/spec/auth/token.md`).
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    /// The token (`token` and `access_token` are equivalent).
    #[serde(default)]
    pub token: Option<String>,
    /// OAuth2 spelling of the same.
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds; 60 when omitted.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and its lifetime.
    pub fn into_parts(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        Some((token, Duration::from_secs(self.expires_in.unwrap_or(60).max(1))))
    }
}

/// Longest a cached `Authorization` value is used before it is fetched again.
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// `Authorization` values per (host, scope), valid until shortly before they expire.
#[derive(Debug, Default)]
pub struct TokenCache {
    // std Mutex: held only for map operations, never across an await.
    entries: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl TokenCache {
    /// A cached header value for `host` and `scope`, if still valid.
    pub fn get(&self, host: &str, scope: &str) -> Option<String> {
        let mut map = self.entries.lock().unwrap();
        let key = (host.to_owned(), scope.to_owned());
        match map.get(&key) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Stores a header value; refreshed 10 s (or a fifth of the lifetime) before expiry, and at least daily.
    pub fn put(&self, host: &str, scope: &str, value: String, lifetime: Duration) {
        // The lifetime is the token server's claim: `expires_in` near `u64::MAX` overflowed `Instant`.
        let lifetime = lifetime.min(MAX_LIFETIME);
        let margin = Duration::from_secs(10).min(lifetime / 5);
        let until = Instant::now() + lifetime - margin;
        let mut map = self.entries.lock().unwrap();
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, (_, u)| *u > now);
        }
        map.insert((host.to_owned(), scope.to_owned()), (value, until));
    }

    /// When the cached value for `host` and `scope` stops being used.
    #[cfg(test)]
    fn valid_until(&self, host: &str, scope: &str) -> Option<Instant> {
        self.entries.lock().unwrap().get(&(host.to_owned(), scope.to_owned())).map(|(_, until)| *until)
    }

    /// Forgets a value the upstream refused, unless a newer one replaced it meanwhile.
    pub fn remove(&self, host: &str, scope: &str, refused: &str) {
        let mut map = self.entries.lock().unwrap();
        let key = (host.to_owned(), scope.to_owned());
        if map.get(&key).is_some_and(|(value, _)| value == refused) {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["scope"], "repository:library/nginx:pull");
    }

    #[test]
    fn parses_several_challenges_and_escapes() {
        let c = parse_challenges(r#"Basic realm="a \"q\"", Bearer realm=https://x/t , service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].params["realm"], r#"a "q""#);
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["service"], "s");
    }

    #[test]
    fn tolerates_garbage() {
        for s in ["", "=", "Bearer realm=\"unterminated", ",,,", "Bearer ==", "\u{0}\u{ff}"] {
            let _ = parse_challenges(s);
        }
    }

    #[test]
    fn token_cache_expires() {
        let cache = TokenCache::default();
        cache.put("h", "s", "Bearer t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("h", "s").as_deref(), Some("Bearer t"));
        assert_eq!(cache.get("h", "other"), None);
        cache.put("h", "s", "Bearer t".into(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(cache.get("h", "s"), None);
    }

    #[test]
    fn token_cache_survives_absurd_lifetimes() {
        // Found by fuzzing (`fuzz/fuzz_targets/token.rs`): `"expires_in": 18446744073709551615` panicked.
        let t: TokenResponse = serde_json::from_str(r#"{"token":"t","expires_in":18446744073709551615}"#).unwrap();
        let (token, lifetime) = t.into_parts().unwrap();
        let cache = TokenCache::default();
        cache.put("h", "s", token, lifetime);
        assert_eq!(cache.get("h", "s").as_deref(), Some("t"));
    }

    #[test]
    fn token_lifetimes_are_capped_at_a_day() {
        // A token server may claim any lifetime; wharf asks again after a day at most.
        let t: TokenResponse = serde_json::from_str(r#"{"token":"t","expires_in":864000}"#).unwrap();
        let (token, lifetime) = t.into_parts().unwrap();
        assert_eq!(lifetime, Duration::from_secs(864_000));
        let cache = TokenCache::default();
        let before = Instant::now();
        cache.put("h", "s", token, lifetime);
        let until = cache.valid_until("h", "s").unwrap();
        assert!(until <= Instant::now() + MAX_LIFETIME, "a ten-day token is kept {:?}", until - before);
        assert!(until >= before + MAX_LIFETIME - Duration::from_secs(11), "capped too short: {:?}", until - before);
        // A shorter lifetime is kept as given (less the refresh margin).
        cache.put("h", "s", "u".into(), Duration::from_secs(3600));
        let until = cache.valid_until("h", "s").unwrap();
        assert!(until <= Instant::now() + Duration::from_secs(3590) && until >= before + Duration::from_secs(3589));
    }

    #[test]
    fn refused_values_are_forgotten_only_while_still_cached() {
        let cache = TokenCache::default();
        cache.put("h", "s", "Bearer new".into(), Duration::from_secs(60));
        cache.remove("h", "s", "Bearer old");
        assert_eq!(cache.get("h", "s").as_deref(), Some("Bearer new"), "a newer token was forgotten");
        cache.remove("h", "s", "Bearer new");
        assert_eq!(cache.get("h", "s"), None);
    }

    #[test]
    fn token_response_defaults() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(t.into_parts(), Some(("abc".into(), Duration::from_secs(60))));
    }
}
