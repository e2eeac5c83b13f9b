//! `<reference>` in a manifest path: a tag or a digest, told apart by `:` (tags cannot contain one).

use super::{Digest, ParseError, ParseKind};
use std::fmt;

/// A manifest reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag, `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    Tag(String),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag or digest.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            return s.parse().map(Reference::Digest);
        }
        let b = s.as_bytes();
        let first_ok = b.first().is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(ParseError::new(ParseKind::Tag, s));
        }
        Ok(Reference::Tag(s.to_owned()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_digests() {
        assert_eq!(Reference::parse("1.27").unwrap(), Reference::Tag("1.27".into()));
        assert!(matches!(Reference::parse(&format!("sha256:{}", "f".repeat(64))).unwrap(), Reference::Digest(_)));
        for bad in ["", ".INVALID_MANIFEST_NAME", "-x", "a/b", &"a".repeat(129), "sha256:x"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
