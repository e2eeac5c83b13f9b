//! Who may read what. Content that wharf could fetch only with its configured credentials is private: it is
//! served only to clients that prove access to the repository named in the request, with a client token
//! configured here or with their own upstream credentials (checked by the upstream, never stored). The check
//! is per request path, and content addressed by digest must belong to that repository, because the cache
//! itself is shared by digest. SECURITY.md has the threat model. The owner of the verdict caches.

use crate::cache::Cache;
use crate::config::{ClientToken, Config, PrivateAnswer, Visibility};
use crate::oci::{Digest, Reference, RepoName};
use crate::upstream::{self, Identity, Probe, RegistryClient};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a request reads.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A manifest by tag or digest.
    Manifest(&'a Reference),
    /// A blob.
    Blob(&'a Digest),
    /// The repository (tags/list, referrers).
    Repository,
}

/// Why a request may not proceed.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// The content is private and the client did not prove access; answer as configured.
    #[error("private content: authentication required")]
    Private(PrivateAnswer),
    /// The repository does not reference this digest (the cache may hold it for another repository).
    #[error("not referenced by this repository")]
    NotReferenced,
    /// Access could not be decided because the upstream failed and nothing is known.
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    /// The metadata could not be read.
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
}

struct TokenRule {
    name: String,
    read: GlobSet,
}

/// Entries older than their TTL are still kept: when the upstream fails, the last verdict is better than none.
type Verdicts<K> = Mutex<HashMap<K, (bool, Instant)>>;

/// The access policy and what it has learnt.
pub struct Access {
    /// sha256 of each client token → what it may read.
    tokens: HashMap<[u8; 32], TokenRule>,
    visibility: HashMap<String, Visibility>,
    answer: PrivateAnswer,
    credential_ttl: Duration,
    visibility_ttl: Duration,
    /// `<registry>/<repo>` → whether anonymous clients may read it.
    public: Verdicts<String>,
    /// (sha256 of an `Authorization` value, `<registry>/<repo>`) → whether the upstream accepted it.
    verdicts: Verdicts<([u8; 32], String)>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("tokens", &self.tokens.len()).field("answer", &self.answer).finish()
    }
}

/// A bad `read` pattern.
#[derive(Debug, thiserror::Error)]
#[error("access.tokens[{name}]: bad pattern {pattern:?}: {reason}")]
pub struct PatternError {
    name: String,
    pattern: String,
    reason: String,
}

impl Access {
    /// The policy from the configuration.
    pub fn from_config(config: &Config) -> Result<Access, PatternError> {
        let mut tokens = HashMap::new();
        for t in &config.access.tokens {
            tokens.insert(hash(&t.token), TokenRule { name: t.name.clone(), read: globs(t)? });
        }
        Ok(Access {
            tokens,
            visibility: config.registries.iter().map(|(n, r)| (n.clone(), r.visibility)).collect(),
            answer: config.access.private_answer,
            credential_ttl: Duration::from_secs(config.access.credential_ttl),
            visibility_ttl: Duration::from_secs(config.access.visibility_ttl),
            public: Mutex::default(),
            verdicts: Mutex::default(),
        })
    }

    /// Whether any content can be private, so that `/v2/` should challenge clients to send credentials.
    pub fn is_active(&self, upstreams: &upstream::Upstreams) -> bool {
        !self.tokens.is_empty()
            || self.visibility.iter().any(|(name, v)| match v {
                Visibility::Private => true,
                Visibility::Public => false,
                Visibility::Auto => upstreams.get(name).is_some_and(|c| c.has_credentials()),
            })
    }

    /// Decides whether a request with `authorization` may read `target` in `repo`.
    pub async fn check(
        &self,
        cache: &Cache,
        client: &RegistryClient,
        repo: &RepoName,
        target: Target<'_>,
        authorization: Option<&str>,
    ) -> Result<(), Denied> {
        let visibility = self.visibility.get(&client.name).copied().unwrap_or_default();
        if visibility != Visibility::Private && !client.has_credentials() {
            // Everything wharf can fetch, any anonymous client could fetch too.
            return Ok(());
        }
        let key = format!("{}/{repo}", client.name);
        let public = match visibility {
            Visibility::Public => true,
            Visibility::Private => false,
            Visibility::Auto => self.is_public(client, repo, target, &key).await?,
        };
        if !public && !self.client_may_read(client, repo, target, &key, authorization).await? {
            return Err(Denied::Private(self.answer));
        }
        let digest = match target {
            Target::Blob(d) | Target::Manifest(Reference::Digest(d)) => d,
            Target::Manifest(Reference::Tag(_)) | Target::Repository => return Ok(()),
        };
        if cache.is_referenced(&client.name, repo, digest)? {
            return Ok(());
        }
        // Ask the upstream whether this repository has the digest before the shared cache answers for it.
        match client.probe(repo, &probe(target), Identity::Wharf).await {
            Ok(()) => Ok(cache.record_ref(&client.name, repo, digest)?),
            Err(upstream::Error::NotFound) => Err(Denied::NotReferenced),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether anonymous clients may read `repo`: learnt with an anonymous probe, kept for `visibility_ttl`.
    async fn is_public(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        target: Target<'_>,
        key: &str,
    ) -> Result<bool, Denied> {
        let known = lookup(&self.public, &key.to_owned());
        if let Some((public, at)) = known
            && at.elapsed() < self.visibility_ttl
        {
            return Ok(public);
        }
        let mut answer = client.probe(repo, &probe(target), Identity::Anonymous).await;
        if matches!(answer, Err(upstream::Error::NotFound)) && !matches!(target, Target::Repository) {
            // A missing tag says nothing about the repository; its tag list does.
            answer = client.probe(repo, &Probe::Repository, Identity::Anonymous).await;
        }
        match answer {
            Ok(()) => {
                remember(&self.public, key.to_owned(), true);
                Ok(true)
            }
            Err(upstream::Error::Unauthorized | upstream::Error::Denied) => {
                remember(&self.public, key.to_owned(), false);
                Ok(false)
            }
            Err(upstream::Error::NotFound) => Ok(false),
            // Upstream down: the last verdict if there is one, else private (fail closed).
            Err(e) => {
                tracing::warn!(repo = key, error = %e, "cannot learn whether the repository is public");
                Ok(known.is_some_and(|(public, _)| public))
            }
        }
    }

    /// Whether the client's `Authorization` grants `repo`: a client token from the configuration, or
    /// credentials the upstream accepts for this repository.
    async fn client_may_read(
        &self,
        client: &RegistryClient,
        repo: &RepoName,
        target: Target<'_>,
        key: &str,
        authorization: Option<&str>,
    ) -> Result<bool, Denied> {
        let Some(auth) = authorization else { return Ok(false) };
        if let Some(rule) = presented_token(auth).and_then(|t| self.tokens.get(&hash(&t))) {
            let allowed = rule.read.is_match(key);
            tracing::debug!(token = %rule.name, repo = key, allowed, "client token");
            // A wharf token is never forwarded upstream, even when it does not grant this repository.
            return Ok(allowed);
        }
        let vkey = (hash(auth), key.to_owned());
        let known = lookup(&self.verdicts, &vkey);
        if let Some((allowed, at)) = known
            && at.elapsed() < self.credential_ttl
        {
            return Ok(allowed);
        }
        let mut answer = client.probe(repo, &probe(target), Identity::Client(auth)).await;
        if matches!(answer, Err(upstream::Error::NotFound)) && !matches!(target, Target::Repository) {
            answer = client.probe(repo, &Probe::Repository, Identity::Client(auth)).await;
        }
        match answer {
            Ok(()) => {
                remember(&self.verdicts, vkey, true);
                Ok(true)
            }
            Err(upstream::Error::Unauthorized | upstream::Error::Denied | upstream::Error::NotFound) => {
                remember(&self.verdicts, vkey, false);
                Ok(false)
            }
            Err(e) => match known {
                Some((allowed, _)) => Ok(allowed),
                None => Err(e.into()),
            },
        }
    }
}

fn probe(target: Target<'_>) -> Probe {
    match target {
        Target::Manifest(r) => Probe::Manifest(r.to_string()),
        Target::Blob(d) => Probe::Blob(d.clone()),
        Target::Repository => Probe::Repository,
    }
}

fn hash(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The secret in a client's `Authorization`: `Bearer <token>` (containerd's `header` setting) or the
/// password of Basic credentials (Docker and podman send their configured credentials for the mirror).
pub fn presented_token(auth: &str) -> Option<String> {
    let (scheme, rest) = auth.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    match upstream::creds::Credentials::from_basic_header(auth)? {
        upstream::creds::Credentials::Basic { password, .. } => Some(password),
        upstream::creds::Credentials::Bearer(_) => None,
    }
}

fn lookup<K: std::hash::Hash + Eq>(map: &Verdicts<K>, key: &K) -> Option<(bool, Instant)> {
    map.lock().unwrap().get(key).copied()
}

fn remember<K: std::hash::Hash + Eq>(map: &Verdicts<K>, key: K, value: bool) {
    let mut map = map.lock().unwrap();
    if map.len() >= 10_000 {
        // Bounded: a flood of distinct credentials cannot grow memory without limit.
        map.clear();
    }
    map.insert(key, (value, Instant::now()));
}

fn globs(t: &ClientToken) -> Result<GlobSet, PatternError> {
    let mut set = GlobSetBuilder::new();
    for pattern in &t.read {
        let err = |reason: String| PatternError { name: t.name.clone(), pattern: pattern.clone(), reason };
        // `*` stays within a path component; `**` crosses them.
        let glob: Glob = GlobBuilder::new(pattern).literal_separator(true).build().map_err(|e| err(e.to_string()))?;
        set.add(glob);
    }
    set.build().map_err(|e| PatternError { name: t.name.clone(), pattern: String::new(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(read: &[&str]) -> ClientToken {
        ClientToken {
            name: "t".into(),
            token: "0123456789abcdef".into(),
            read: read.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn patterns_respect_path_components() {
        let set = globs(&token(&["ghcr.io/acme/*", "reg.example:5000/**"])).unwrap();
        assert!(set.is_match("ghcr.io/acme/app"));
        assert!(!set.is_match("ghcr.io/acme/team/app"));
        assert!(!set.is_match("ghcr.io/acmex/app"));
        assert!(!set.is_match("docker.io/acme/app"));
        assert!(set.is_match("reg.example:5000/a/b/c"));
    }

    #[test]
    fn tokens_come_from_bearer_values() {
        assert_eq!(presented_token("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(presented_token("bearer  abc ").as_deref(), Some("abc"));
        // base64("wharf:s3cret")
        assert_eq!(presented_token("Basic d2hhcmY6czNjcmV0").as_deref(), Some("s3cret"));
        assert_eq!(presented_token("Basic !!"), None);
        assert_eq!(presented_token("Bearer"), None);
    }
}
