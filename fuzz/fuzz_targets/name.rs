//! Repository names (`/v2/<name>/…`, warm-list images, admin requests): a parsed name is exactly its input,
//! re-parses to itself, and never contains a component that could escape a path (`..`, empty).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::RepoName;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(name) = RepoName::parse(s) else { return };
    assert_eq!(name.as_str(), s);
    assert_eq!(name.to_string(), s);
    assert_eq!(RepoName::parse(name.as_str()).as_ref(), Ok(&name));
    assert!(s.len() <= 255);
    assert!(s.split('/').all(|c| !c.is_empty() && c != "." && c != ".."), "{s:?}");
    assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)), "{s:?}");
    // Docker Hub normalisation keeps the name valid (it is sent upstream and used as a metadata key).
    match name.clone().with_library_prefix() {
        Ok(prefixed) => {
            assert!(prefixed.as_str().contains('/'));
            assert!(prefixed.as_str().ends_with(s));
            assert_eq!(RepoName::parse(prefixed.as_str()).as_ref(), Ok(&prefixed), "{s:?}");
        }
        Err(_) => assert!(!s.contains('/') && s.len() + "library/".len() > 255, "{s:?}"),
    }
});
