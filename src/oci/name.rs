//! Repository names per the distribution-spec grammar, and Docker Hub's `library/` normalisation.

use super::{ParseError, ParseKind};
use std::fmt;

/// Longest `name` clients accept (distribution/reference `RepositoryNameTotalLengthMax`).
const MAX_NAME_LEN: usize = 255;

/// A validated repository name such as `library/nginx`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Validates `s` against `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(ParseError::new(ParseKind::Name, s));
        }
        Ok(RepoName(s.to_owned()))
    }

    /// Docker Hub keeps official images under `library/`: `nginx` is `library/nginx` there. Fails when the
    /// prefix makes the name longer than the spec allows (a 250-character name is valid, `library/` + it is not).
    pub fn with_library_prefix(self) -> Result<Self, ParseError> {
        if self.0.contains('/') { Ok(self) } else { RepoName::parse(&format!("library/{}", self.0)) }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Separators: `.`, `_`, `__`, or any run of `-`; never two separators of other kinds side by side.
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for ok in
            ["nginx", "library/nginx", "a/b/c", "my-app", "my--app", "a_b", "a__b", "a.b", "docker.io/library/x", "0"]
        {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(256);
        for bad in
            ["", "Nginx", "a//b", "/a", "a/", "a..b", "a___b", "-a", "a-", "..", "a/../b", "a b", "a:b", &long, "a._b"]
        {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn library_prefix_only_for_single_component() {
        assert_eq!(RepoName::parse("nginx").unwrap().with_library_prefix().unwrap().as_str(), "library/nginx");
        assert_eq!(RepoName::parse("bitnami/redis").unwrap().with_library_prefix().unwrap().as_str(), "bitnami/redis");
    }

    #[test]
    fn library_prefix_keeps_the_length_limit() {
        // Found by fuzzing (`fuzz/fuzz_targets/name.rs`): the prefixed name was longer than any valid name.
        let long = "a".repeat(MAX_NAME_LEN);
        let name = RepoName::parse(&long).unwrap();
        assert_eq!(name.with_library_prefix().unwrap_err().kind, ParseKind::Name);
        let fits = RepoName::parse(&"a".repeat(MAX_NAME_LEN - "library/".len())).unwrap();
        assert_eq!(fits.with_library_prefix().unwrap().as_str().len(), MAX_NAME_LEN);
    }
}
