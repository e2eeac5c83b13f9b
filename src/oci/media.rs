//! Manifest media types and the client's `Accept` set, merged from every `Accept` header line.

/// Single-platform manifest types a mirror passes through untouched.
pub const MANIFEST_TYPES: &[&str] =
    &["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];

/// Multi-platform types: OCI index and Docker manifest list.
pub const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];

/// True for index/list media types.
pub fn is_index_type(media_type: &str) -> bool {
    INDEX_TYPES.contains(&media_type)
}

/// The media types a client accepts, merged across header lines (skopeo sends six `Accept` lines).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcceptSet {
    types: Vec<String>,
}

impl AcceptSet {
    /// Merges header values; parameters (`;q=…`) are dropped, duplicates removed, order kept.
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut types: Vec<String> = Vec::new();
        for value in values {
            for item in value.split(',') {
                let t = item.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                if !t.is_empty() && !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        AcceptSet { types }
    }

    /// The set wharf uses when a client sends none: every modern manifest type.
    pub fn all_manifests() -> Self {
        AcceptSet { types: MANIFEST_TYPES.iter().chain(INDEX_TYPES).map(|s| s.to_string()).collect() }
    }

    /// True when the client named no types at all.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// True when `media_type` is acceptable (`*/*` and `application/*` included).
    pub fn accepts(&self, media_type: &str) -> bool {
        self.is_empty()
            || self.types.iter().any(|t| {
                t == media_type || t == "*/*" || (t.ends_with("/*") && media_type.starts_with(&t[..t.len() - 1]))
            })
    }

    /// True when an index or manifest list is acceptable: decides which cached tag entry applies,
    /// since a registry answers the same tag with a platform manifest when lists are not accepted.
    pub fn accepts_index(&self) -> bool {
        INDEX_TYPES.iter().any(|t| self.accepts(t))
    }

    /// The header value to send upstream: every modern manifest type the client accepts, named explicitly
    /// (the reference registry answers `*/*` with 404 for OCI content), then the client's own entries.
    pub fn header_value(&self) -> String {
        let mut out: Vec<&str> =
            MANIFEST_TYPES.iter().chain(INDEX_TYPES).copied().filter(|t| self.accepts(t)).collect();
        for t in &self.types {
            if !out.contains(&t.as_str()) {
                out.push(t);
            }
        }
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lines_and_drops_parameters() {
        let a = AcceptSet::from_headers([
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json; q=0.9, application/vnd.oci.image.manifest.v1+json",
        ]);
        assert_eq!(
            a.header_value(),
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
        );
        let wildcard = AcceptSet::from_headers(["*/*"]).header_value();
        assert!(wildcard.starts_with("application/vnd.oci.image.manifest.v1+json"), "{wildcard}");
        assert!(wildcard.ends_with("*/*"), "{wildcard}");
        assert!(!a.accepts_index());
        assert!(AcceptSet::from_headers(["*/*"]).accepts_index());
        assert!(AcceptSet::from_headers(Vec::<&str>::new()).accepts_index());
    }
}
