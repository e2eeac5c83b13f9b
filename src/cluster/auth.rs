//! Peer request signatures: HMAC-SHA256 over method, path and query, a timestamp and the sender's id, with a
//! shared key. Without them any pod could use the peer port to spend the mirror's upstream credentials and
//! rate limits, or read private content an edge has not authorized.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::path::Path;

/// The header that carries the signature: `v1 <unix seconds> <hex HMAC>`.
pub const AUTH_HEADER: &str = "x-wharf-peer-auth";
/// The header that names the sender (its peer address) and marks a request as a peer's: never forwarded.
pub const PEER_HEADER: &str = "x-wharf-peer";
/// Seconds a signature's timestamp may be off this node's clock, either way.
pub const MAX_SKEW: u64 = 60;
/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 32;

/// Why the key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("peer key file {0}: {1}")]
    Read(String, std::io::Error),
    /// A line is not a usable key.
    #[error("peer key file {0}, line {1}: a key is a printable string of at least 32 characters")]
    Weak(String, usize),
    /// No key at all.
    #[error("peer key file {0} holds no key")]
    Empty(String),
}

/// Why a peer request was refused (each answered 401, before any other work).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// No signature or sender header.
    #[error("peer request without a signature")]
    Missing,
    /// The header is not `v1 <ts> <hex>`.
    #[error("malformed peer signature")]
    Malformed,
    /// The timestamp is further than [`MAX_SKEW`] from this node's clock.
    #[error("peer signature timestamp outside the allowed clock skew")]
    Expired,
    /// No key verifies the signature.
    #[error("bad peer signature")]
    Bad,
}

/// The shared keys: the first signs, every one verifies (two at once while a key is rotated).
#[derive(Clone)]
pub struct Keys(Vec<Vec<u8>>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} redacted)", self.0.len())
    }
}

impl Keys {
    /// Reads the key file: one key a line, blank lines and `#` comments skipped. Blocking.
    pub fn load(path: &Path) -> Result<Keys, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read(path.display().to_string(), e))?;
        Keys::parse_file(&text, path)
    }

    /// Keys from the text of the key file at `path` (named in errors).
    pub fn parse_file(text: &str, path: &Path) -> Result<Keys, KeyError> {
        let shown = path.display().to_string();
        Keys::parse(text).map_err(|line| match line {
            0 => KeyError::Empty(shown),
            n => KeyError::Weak(shown, n),
        })
    }

    /// Parses key file text; `Err(line)` names a weak key's line, `Err(0)` an empty file.
    fn parse(text: &str) -> Result<Keys, usize> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_KEY_LEN || !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(i + 1);
            }
            keys.push(line.as_bytes().to_vec());
        }
        if keys.is_empty() {
            return Err(0);
        }
        Ok(Keys(keys))
    }

    /// Keys from literal strings (tests).
    pub fn from_strings(keys: &[&str]) -> Keys {
        Keys(keys.iter().map(|k| k.as_bytes().to_vec()).collect())
    }

    fn mac(key: &[u8], method: &str, target: &str, ts: u64, sender: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(format!("{method}\n{target}\n{ts}\n{sender}").as_bytes());
        mac
    }

    /// The [`AUTH_HEADER`] value for a request (`target`: path and query, as sent).
    pub fn sign(&self, method: &str, target: &str, ts: u64, sender: &str) -> String {
        let tag = Keys::mac(&self.0[0], method, target, ts, sender).finalize().into_bytes();
        format!("v1 {ts} {}", hex::encode(tag))
    }

    /// Checks a request's signature at time `now` (unix seconds); the comparison is constant-time.
    pub fn verify(
        &self,
        method: &str,
        target: &str,
        sender: Option<&str>,
        header: Option<&str>,
        now: u64,
    ) -> Result<(), Refused> {
        let (Some(sender), Some(header)) = (sender, header) else { return Err(Refused::Missing) };
        let mut parts = header.split(' ');
        let (Some("v1"), Some(ts), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Refused::Malformed);
        };
        let ts: u64 = ts.parse().map_err(|_| Refused::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| Refused::Malformed)?;
        if ts.abs_diff(now) > MAX_SKEW {
            return Err(Refused::Expired);
        }
        let ok = self.0.iter().any(|key| Keys::mac(key, method, target, ts, sender).verify_slice(&tag).is_ok());
        if ok { Ok(()) } else { Err(Refused::Bad) }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_signature_verifies_only_for_the_same_request_key_and_time() {
        let keys = Keys::from_strings(&[A]);
        let t = "/v2/x/blobs/sha256:00?ns=docker.io";
        let sig = keys.sign("GET", t, 1000, "10.0.0.1:5001");
        assert_eq!(keys.verify("GET", t, Some("10.0.0.1:5001"), Some(&sig), 1000), Ok(()));
        assert_eq!(keys.verify("GET", t, Some("10.0.0.1:5001"), Some(&sig), 1060), Ok(()));
        assert_eq!(keys.verify("GET", t, Some("10.0.0.1:5001"), Some(&sig), 1061), Err(Refused::Expired));
        assert_eq!(keys.verify("GET", t, Some("10.0.0.1:5001"), Some(&sig), 939), Err(Refused::Expired));
        assert_eq!(keys.verify("HEAD", t, Some("10.0.0.1:5001"), Some(&sig), 1000), Err(Refused::Bad));
        assert_eq!(keys.verify("GET", "/v2/y", Some("10.0.0.1:5001"), Some(&sig), 1000), Err(Refused::Bad));
        assert_eq!(keys.verify("GET", t, Some("10.0.0.2:5001"), Some(&sig), 1000), Err(Refused::Bad));
        assert_eq!(keys.verify("GET", t, None, Some(&sig), 1000), Err(Refused::Missing));
        assert_eq!(keys.verify("GET", t, Some("s"), None, 1000), Err(Refused::Missing));
        assert_eq!(keys.verify("GET", t, Some("s"), Some("v2 1000 00"), 1000), Err(Refused::Malformed));
        assert_eq!(keys.verify("GET", t, Some("s"), Some("v1 x 00"), 1000), Err(Refused::Malformed));
        let other = Keys::from_strings(&[B]);
        assert_eq!(other.verify("GET", t, Some("10.0.0.1:5001"), Some(&sig), 1000), Err(Refused::Bad));
    }

    #[test]
    fn during_rotation_both_keys_verify_and_the_first_signs() {
        let old = Keys::from_strings(&[A]);
        let rotating = Keys::from_strings(&[B, A]);
        let by_old = old.sign("GET", "/p", 5, "s");
        let by_new = rotating.sign("GET", "/p", 5, "s");
        assert_eq!(rotating.verify("GET", "/p", Some("s"), Some(&by_old), 5), Ok(()));
        assert_eq!(rotating.verify("GET", "/p", Some("s"), Some(&by_new), 5), Ok(()));
        assert_eq!(old.verify("GET", "/p", Some("s"), Some(&by_new), 5), Err(Refused::Bad));
    }

    #[test]
    fn weak_or_missing_keys_are_refused() {
        assert_eq!(Keys::parse("short\n").unwrap_err(), 1);
        assert_eq!(Keys::parse("# only a comment\n\n").unwrap_err(), 0);
        assert_eq!(Keys::parse(&format!("{A}\nwith space in the middle of a key that is long\n")).unwrap_err(), 2);
        assert_eq!(Keys::parse(&format!("# rotation\n{A}\n{B}\n")).unwrap().0.len(), 2);
    }
}
