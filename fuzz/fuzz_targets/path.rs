//! The `/v2/…` path parser (the part after `/v2/`). An endpoint is recognised only when the path is exactly
//! `<name>/<kind>/<last>`: formatting it back gives the input, so nothing in the path is silently dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::api::path::{Endpoint, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(rest) = std::str::from_utf8(data) else { return };
    let Ok(endpoint) = parse(rest) else { return };
    let formatted = match &endpoint {
        Endpoint::Manifest(name, reference) => format!("{name}/manifests/{reference}"),
        Endpoint::Blob(name, digest) => format!("{name}/blobs/{digest}"),
        Endpoint::Referrers(name, digest) => format!("{name}/referrers/{digest}"),
        Endpoint::TagsList(name) => format!("{name}/tags/list"),
        Endpoint::Upload => {
            assert!(rest.contains("/blobs/uploads"), "{rest:?}");
            return;
        }
    };
    assert_eq!(formatted, rest);
    assert_eq!(parse(&formatted).unwrap(), endpoint);
});
