//! Bearer token responses from a registry's token realm (JSON). A response yields a non-empty token with a
//! lifetime of at least a second, and caching it works for any lifetime the server claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use wharf::upstream::auth::{TokenCache, TokenResponse};

fuzz_target!(|data: &[u8]| {
    let Ok(response) = serde_json::from_slice::<TokenResponse>(data) else { return };
    let Some((token, lifetime)) = response.into_parts() else { return };
    assert!(!token.is_empty());
    assert!(lifetime >= Duration::from_secs(1));
    let cache = TokenCache::default();
    let value = format!("Bearer {token}");
    cache.put("https://r.example:443", "repository:a/b:pull", value.clone(), lifetime);
    assert_eq!(cache.get("https://r.example:443", "repository:a/b:pull"), Some(value));
    assert_eq!(cache.get("https://other.example:443", "repository:a/b:pull"), None);
    assert_eq!(cache.get("https://r.example:443", "repository:a/c:pull"), None);
});
