//! Upstream response headers that steer a fill: `Content-Range` of a 206 (first line of the input; the fill
//! writes at its offsets) and a redirect's `Location` (the rest). A parsed range is ordered and within its
//! length and formats back to itself; a redirect only ever leads to `http` or `https`.
#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use wharf::upstream::fuzzing::{parse_content_range, redirect_target};

fuzz_target!(|data: &[u8]| {
    let (range, location) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(range) = std::str::from_utf8(range)
        && let Some((first, last, complete)) = parse_content_range(range)
    {
        assert!(first <= last && last < complete, "{range:?}");
        assert_eq!(parse_content_range(&format!("bytes {first}-{last}/{complete}")), Some((first, last, complete)));
    }
    let Ok(location) = HeaderValue::from_bytes(location) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, location);
    let from = url::Url::parse("https://registry.example:8443/v2/org/app/blobs/sha256:0").unwrap();
    if let Ok(to) = redirect_target(&from, &headers) {
        assert!(matches!(to.scheme(), "http" | "https"), "{to}");
        assert!(to.host_str().is_some_and(|h| !h.is_empty()), "{to}");
    }
});
