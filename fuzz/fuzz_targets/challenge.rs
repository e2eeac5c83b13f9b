//! `WWW-Authenticate` values from upstream registries. Parsing never fails or panics; schemes and parameter
//! names are non-empty tokens, lowercased; and the challenges, written back in canonical form (every value
//! quoted and escaped), parse to the same challenges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::upstream::auth::{Challenge, parse_challenges};

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data);
    let challenges = parse_challenges(&value);
    for c in &challenges {
        assert!(is_token(&c.scheme) && c.scheme == c.scheme.to_ascii_lowercase(), "{c:?}");
        for name in c.params.keys() {
            assert!(is_token(name) && *name == name.to_ascii_lowercase(), "{c:?}");
        }
    }
    let canonical = challenges.iter().map(format).collect::<Vec<_>>().join(", ");
    assert_eq!(parse_challenges(&canonical), challenges, "{canonical:?}");
});

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c))
}

fn format(c: &Challenge) -> String {
    let params: Vec<String> =
        c.params.iter().map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))).collect();
    if params.is_empty() { c.scheme.clone() } else { format!("{} {}", c.scheme, params.join(", ")) }
}
