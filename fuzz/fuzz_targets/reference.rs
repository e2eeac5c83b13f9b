//! Manifest references (`/v2/<name>/manifests/<reference>`): a tag or a digest. A parsed reference formats back
//! to exactly its input and re-parses to the same value; tags are within the distribution-spec grammar.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::{Digest, Reference};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(r) = Reference::parse(s) else { return };
    assert_eq!(r.to_string(), s);
    assert_eq!(Reference::parse(&r.to_string()).as_ref(), Ok(&r));
    match &r {
        Reference::Tag(t) => {
            assert!(!t.is_empty() && t.len() <= 128, "{t:?}");
            assert!(!t.starts_with(['.', '-']), "{t:?}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)), "{t:?}");
        }
        Reference::Digest(d) => assert_eq!(s.parse::<Digest>().as_ref(), Ok(d)),
    }
});
