//! What a manifest or index refers to: config and layers, or child manifests with their platforms.
//! Parsed leniently from the exact bytes (which are never re-serialised); unknown fields are ignored.

use super::Digest;

/// A platform, as in an index entry (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Platform {
    /// `linux`, `windows`, …
    pub os: String,
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `v7`, `v8`, …
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// True when `spec` (`os/arch` or `os/arch/variant`) names this platform.
    pub fn matches(&self, spec: &str) -> bool {
        let mut parts = spec.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        os == Some(self.os.as_str())
            && arch == Some(self.architecture.as_str())
            && (variant.is_none() || variant == self.variant.as_deref())
    }
}

/// A descriptor's digest (and platform, for index entries).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Descriptor {
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    #[serde(default)]
    pub size: u64,
    /// Media type.
    #[serde(default, rename = "mediaType")]
    pub media_type: String,
    /// Index entries only.
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// The references of an image manifest (config, layers) or an index (manifests).
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct References {
    /// Image manifests: the config blob.
    #[serde(default)]
    pub config: Option<Descriptor>,
    /// Image manifests: the layers.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Indexes and manifest lists: the child manifests.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

impl References {
    /// Parses a manifest's bytes; `None` when they are not a JSON object of this shape.
    pub fn parse(bytes: &[u8]) -> Option<References> {
        // serde would also accept a JSON array for a struct; a manifest is always an object.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    /// Blobs an image manifest needs: config first, then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manifests_and_indexes() {
        let d = format!("sha256:{}", "a".repeat(64));
        let m = format!(r#"{{"config":{{"digest":"{d}","size":1}},"layers":[{{"digest":"{d}","size":2}}],"x":1}}"#);
        let r = References::parse(m.as_bytes()).unwrap();
        assert_eq!(r.blobs().count(), 2);
        let i = format!(
            r#"{{"manifests":[{{"digest":"{d}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let r = References::parse(i.as_bytes()).unwrap();
        let p = r.manifests[0].platform.as_ref().unwrap();
        assert!(p.matches("linux/arm64") && p.matches("linux/arm64/v8") && !p.matches("linux/amd64"));
        assert!(References::parse(b"[]").is_none());
        assert!(References::parse(br#"{"layers":[{"digest":"md5:x"}]}"#).is_none());
    }
}
