//! Upstream credentials from the config file and from a docker `config.json` (a `dockerconfigjson` Secret).

use crate::config::Config;
use base64::Engine as _;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Credentials for one registry. Debug output is redacted so they never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (or personal access token), used for Basic auth and token requests.
    Basic {
        /// The user.
        username: String,
        /// The secret.
        password: String,
    },
    /// A static bearer token sent as is.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credentials {
    /// The `Authorization` header value for Basic auth, if these are Basic credentials.
    pub fn basic_header(&self) -> Option<String> {
        match self {
            Credentials::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credentials::Bearer(_) => None,
        }
    }

    /// Parses an `Authorization: Basic …` value a client sent (what Docker and podman send a mirror).
    pub fn from_basic_header(value: &str) -> Option<Credentials> {
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let (username, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some(Credentials::Basic { username: username.to_owned(), password: password.to_owned() })
    }
}

/// Why a credentials file could not be used. The message never includes file contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read credentials file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a docker config.json.
    #[error("credentials file {path} is not a docker config.json: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong (no secret values).
        reason: String,
    },
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

/// Maps the keys docker and kubectl write (`https://index.docker.io/v1/`, `ghcr.io`, `https://quay.io`) to
/// the registry names wharf uses.
pub fn normalize_registry_key(key: &str) -> String {
    let host = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".into(),
        other => other.to_owned(),
    }
}

/// Collects credentials per registry name: the credentials file first, then config values, which win.
pub fn load(config: &Config) -> Result<HashMap<String, Credentials>, Error> {
    let mut out = match &config.credentials_file {
        Some(path) => from_docker_config(path)?,
        None => HashMap::new(),
    };
    for (name, reg) in &config.registries {
        if let Some(token) = &reg.token {
            out.insert(name.clone(), Credentials::Bearer(token.clone()));
        } else if let (Some(u), Some(p)) = (&reg.username, &reg.password) {
            out.insert(name.clone(), Credentials::Basic { username: u.clone(), password: p.clone() });
        }
    }
    Ok(out)
}

/// Reads a docker `config.json`.
pub fn from_docker_config(path: &Path) -> Result<HashMap<String, Credentials>, Error> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| Error::Read { path: shown.clone(), source })?;
    // serde's message could quote a value; report only the position.
    let parsed: DockerConfig = serde_json::from_slice(&text)
        .map_err(|e| Error::Format { path: shown.clone(), reason: format!("invalid JSON at line {}", e.line()) })?;
    let mut out = HashMap::new();
    for (key, a) in parsed.auths {
        let creds = if let Some(t) = a.registrytoken {
            Credentials::Bearer(t)
        } else if let (Some(u), Some(p)) = (a.username, a.password) {
            Credentials::Basic { username: u, password: p }
        } else if let Some(auth) = a.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| Error::Format {
                    path: shown.clone(),
                    reason: format!("`auth` for {key} is not base64"),
                })?;
            let (u, p) = decoded
                .split_once(':')
                .ok_or_else(|| Error::Format { path: shown.clone(), reason: format!("`auth` for {key} lacks ':'") })?;
            Credentials::Basic { username: u.to_owned(), password: p.to_owned() }
        } else {
            continue;
        };
        out.insert(normalize_registry_key(&key), creds);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dockerconfigjson() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"ghcr.io":{{"username":"bob","password":"pat"}}}}}}"#),
        )
        .unwrap();
        let creds = from_docker_config(&path).unwrap();
        assert_eq!(creds["docker.io"], Credentials::Basic { username: "alice".into(), password: "s3cret".into() });
        assert_eq!(creds["ghcr.io"], Credentials::Basic { username: "bob".into(), password: "pat".into() });
        assert!(!format!("{creds:?}").contains("s3cret"));
    }

    #[test]
    fn bad_file_error_hides_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"x": {"auth": "topsecret!!"}}}"#).unwrap();
        let err = from_docker_config(&path).unwrap_err().to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }
}
