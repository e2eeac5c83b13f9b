//! Digests (paths, `Docker-Content-Digest`, manifest descriptors, admin requests): only the canonical form is
//! accepted, so a parsed digest formats to exactly its input; the hex part is safe as a file name; the JSON
//! form (descriptors in manifests) agrees with the string form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::{Algorithm, Digest, Verifier};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(d) = s.parse::<Digest>()
    {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
        let want = match d.algorithm() {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        };
        assert_eq!(d.hex().len(), want);
        assert!(d.hex().bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')), "{s:?}");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }
    // The JSON form straight from the input, as a manifest descriptor carries it.
    if let Ok(d) = serde_json::from_slice::<Digest>(data) {
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
    }
    // Verification agrees with the one-shot digest.
    let mut v = Verifier::new(Algorithm::Sha256);
    v.update(data);
    let d = v.finish();
    assert_eq!(d, Digest::sha256_of(data));
    assert!(d.matches(data));
});
