//! `Accept` headers (one value per line, as clients send several). Every type the client named is accepted;
//! the value sent upstream is a valid header value when the input was, and accepts the same manifest types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::{AcceptSet, INDEX_TYPES, MANIFEST_TYPES};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let lines: Vec<&str> = s.lines().collect();
    let set = AcceptSet::from_headers(lines.iter().copied());
    for line in &lines {
        for item in line.split(',') {
            let t = item.split(';').next().unwrap().trim().to_ascii_lowercase();
            if t.is_empty() {
                continue;
            }
            assert!(set.accepts(&t), "{t:?}");
        }
    }
    let value = set.header_value();
    let resent = AcceptSet::from_headers([value.as_str()]);
    for t in MANIFEST_TYPES.iter().chain(INDEX_TYPES) {
        assert_eq!(set.accepts(t), resent.accepts(t), "{t}: {value:?}");
    }
    if lines.iter().all(|l| http::HeaderValue::from_str(l).is_ok()) {
        assert!(http::HeaderValue::from_str(&value).is_ok(), "{value:?}");
    }
});
