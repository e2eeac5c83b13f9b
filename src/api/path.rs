//! `/v2/<name>/<endpoint>` parsed from the right: `<reference>` and `<digest>` never contain `/`, while a name
//! may contain a component called `blobs` or `manifests`. Pure; no routing decisions here.

use super::error::{Error, OciCode};
use crate::oci::{Digest, Reference};

/// A pull-side endpoint with the name still unrouted (it may carry a registry prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `/v2/<name>/manifests/<reference>`
    Manifest(&'a str, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(&'a str, Digest),
    /// `/v2/<name>/tags/list`
    TagsList(&'a str),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(&'a str, Digest),
    /// `/v2/<name>/blobs/uploads/…`: push, which a mirror does not support.
    Upload,
}

/// Parses the part of the path after `/v2/`.
pub fn parse(rest: &str) -> Result<Endpoint<'_>, Error> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Endpoint::TagsList(name));
    }
    if rest.contains("/blobs/uploads") {
        return Ok(Endpoint::Upload);
    }
    let mut parts = rest.rsplitn(3, '/');
    let (Some(last), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::new(OciCode::NameUnknown, "unknown endpoint"));
    };
    match kind {
        "manifests" => Ok(Endpoint::Manifest(name, Reference::parse(last)?)),
        "blobs" => Ok(Endpoint::Blob(name, last.parse()?)),
        "referrers" => Ok(Endpoint::Referrers(name, last.parse()?)),
        _ => Err(Error::new(OciCode::NameUnknown, "unknown endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_from_the_right() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parse("a/blobs/b/manifests/v1").unwrap(),
            Endpoint::Manifest("a/blobs/b", Reference::Tag("v1".into()))
        );
        assert!(matches!(
            parse(&format!("docker.io/library/x/blobs/{d}")).unwrap(),
            Endpoint::Blob("docker.io/library/x", _)
        ));
        assert_eq!(parse("x/y/tags/list").unwrap(), Endpoint::TagsList("x/y"));
        assert!(matches!(parse(&format!("x/referrers/{d}")).unwrap(), Endpoint::Referrers("x", _)));
        assert_eq!(parse("x/blobs/uploads/").unwrap(), Endpoint::Upload);
    }

    #[test]
    fn rejects_bad_parts_with_oci_codes() {
        assert_eq!(parse("x/blobs/sha256:zz").unwrap_err().code, OciCode::DigestInvalid);
        assert_eq!(parse("x/blobs/md5:abc").unwrap_err().code, OciCode::DigestInvalid);
        assert_eq!(parse("x/manifests/.INVALID_MANIFEST_NAME").unwrap_err().code, OciCode::ManifestUnknown);
        assert_eq!(parse("x").unwrap_err().code, OciCode::NameUnknown);
        assert_eq!(parse("x/foo/bar").unwrap_err().code, OciCode::NameUnknown);
    }
}
