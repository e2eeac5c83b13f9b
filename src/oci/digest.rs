//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and a streaming verifier.
//! Only the registered algorithms wharf can verify are accepted: a mirror must never store what it cannot check.

use super::{ParseError, ParseKind};
use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// A supported digest algorithm (image-spec `descriptor.md`, "Registered algorithms").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// `sha256`, 64 lowercase hex characters.
    Sha256,
    /// `sha512`, 128 lowercase hex characters.
    Sha512,
}

impl Algorithm {
    /// The name used in digests and in the store's directory tree.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated digest. The hex part is lowercase by construction, so equal content has equal digests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algo: Algorithm,
    hex: String,
}

impl Digest {
    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algo
    }

    /// The encoded (hex) part; safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Computes the sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest { algo: Algorithm::Sha256, hex: hex::encode(sha2::Sha256::digest(bytes)) }
    }

    /// Computes the digest of `bytes` with this digest's algorithm.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut v = Verifier::new(self.algo);
        v.update(bytes);
        v.finish() == *self
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::new(ParseKind::Digest, s);
        let (algo, hex) = s.split_once(':').ok_or_else(err)?;
        let algo = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(err()),
        };
        let valid = hex.len() == algo.hex_len() && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(err());
        }
        Ok(Digest { algo, hex: hex.to_owned() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.as_str(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes bytes as they stream past, so verification needs no second read of the file.
#[derive(Clone)]
pub enum Verifier {
    /// sha256 state.
    Sha256(sha2::Sha256),
    /// sha512 state.
    Sha512(sha2::Sha512),
}

impl Verifier {
    /// A fresh hasher for `algo`.
    pub fn new(algo: Algorithm) -> Self {
        match algo {
            Algorithm::Sha256 => Verifier::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Verifier::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            Verifier::Sha256(h) => Digest { algo: Algorithm::Sha256, hex: hex::encode(h.finalize()) },
            Verifier::Sha512(h) => Digest { algo: Algorithm::Sha512, hex: hex::encode(h.finalize()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registered_algorithms() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        let d: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert_eq!(d.to_string(), format!("sha512:{}", "0".repeat(128)));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "a".repeat(63)),
            &format!("sha512:{}", "a".repeat(64)),
            &format!("md5:{}", "a".repeat(32)),
            &format!("sha256:../{}", "a".repeat(61)),
            "sha256:totallywrong",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn verifier_matches_known_value() {
        let d = Digest::sha256_of(b"");
        assert_eq!(d.hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(d.matches(b""));
        assert!(!d.matches(b"x"));
    }
}
