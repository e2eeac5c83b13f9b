//! `Range` request headers. Input: the resource size in decimal on the first line, the header value after it.
//! A partial answer lies within the resource; a well-formed single range gets exactly the RFC 9110 answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::api::range::{RangeAnswer, resolve};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (size, header) = s.split_once('\n').unwrap_or((s, ""));
    let size: u64 = size.trim().parse().unwrap_or(size.len() as u64);
    check(Some(header), size);
    check(None, size);

    // The same numbers as a well-formed `bytes=a-b` / `bytes=a-` / `bytes=-n`, with the expected answers.
    let nums: Vec<u64> = header.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    if let [a, b, ..] = nums[..] {
        let expect = if a > b {
            RangeAnswer::Full
        } else if a >= size {
            RangeAnswer::Unsatisfiable
        } else {
            RangeAnswer::Partial { start: a, end: b.min(size - 1) }
        };
        assert_eq!(resolve(Some(&format!("bytes={a}-{b}")), size), expect, "{a}-{b} of {size}");
    }
    if let Some(&a) = nums.first() {
        let from = if a < size { RangeAnswer::Partial { start: a, end: size - 1 } } else { RangeAnswer::Unsatisfiable };
        assert_eq!(resolve(Some(&format!("bytes={a}-")), size), from, "{a}- of {size}");
        let last = if a == 0 || size == 0 {
            RangeAnswer::Unsatisfiable
        } else {
            RangeAnswer::Partial { start: size.saturating_sub(a), end: size - 1 }
        };
        assert_eq!(resolve(Some(&format!("bytes=-{a}")), size), last, "-{a} of {size}");
    }
});

fn check(header: Option<&str>, size: u64) {
    match resolve(header, size) {
        RangeAnswer::Partial { start, end } => assert!(start <= end && end < size, "{header:?} of {size}"),
        RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
    }
    if header.is_none() {
        assert_eq!(resolve(header, size), RangeAnswer::Full);
    }
}
