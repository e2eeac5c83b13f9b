//! The OCI vocabulary: repository names, references, digests and media types.
//! Pure types with no I/O, so every parser of outside input here can be unit-tested and fuzzed.

mod digest;
pub mod manifest;
mod media;
mod name;
mod reference;

pub use digest::{Algorithm, Digest, Verifier};
pub use media::{AcceptSet, INDEX_TYPES, MANIFEST_TYPES, is_index_type};
pub use name::RepoName;
pub use reference::Reference;

/// Why a piece of outside input was rejected, with the input kept for the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {input:?}")]
pub struct ParseError {
    /// What was being parsed.
    pub kind: ParseKind,
    /// The offending input, truncated to keep logs bounded.
    pub input: String,
}

/// What kind of value failed to parse; decides the OCI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseKind {
    /// A repository name (`NAME_INVALID`).
    Name,
    /// A tag (`MANIFEST_INVALID`/`TAG_INVALID` territory; served as 404 like distribution).
    Tag,
    /// A digest (`DIGEST_INVALID`).
    Digest,
}

impl std::fmt::Display for ParseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseKind::Name => "repository name",
            ParseKind::Tag => "tag",
            ParseKind::Digest => "digest",
        })
    }
}

impl ParseError {
    pub(crate) fn new(kind: ParseKind, input: &str) -> Self {
        let input = input.chars().take(300).collect();
        ParseError { kind, input }
    }
}
