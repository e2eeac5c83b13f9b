//! `Range` request header → one byte range, per RFC 9110 §14.1.2 (byte-range specs) and §14.2.
//! Pure and unit-tested. Multi-range requests are answered with the whole body (200), which RFC 9110 §14.2
//! permits and containers/image accepts.

/// What to send for a request on a resource of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole body (no `Range`, a multi-range, or a header we must ignore).
    Full,
    /// 206 with bytes `start..=end`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Interprets a `Range` header value for a resource of `size` bytes.
/// Syntactically invalid headers are ignored (RFC 9110 §14.2: "a server MAY ignore the Range header").
pub fn resolve(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(value) = header else { return RangeAnswer::Full };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let parse = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial { start: size.saturating_sub(n), end: size - 1 },
            None => RangeAnswer::Full,
        },
        // bytes=A-
        (false, true) => match parse(first) {
            Some(a) if a < size => RangeAnswer::Partial { start: a, end: size - 1 },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Full,
        },
        // bytes=A-B
        (false, false) => match (parse(first), parse(last)) {
            (Some(a), Some(b)) if a > b => RangeAnswer::Full,
            (Some(a), Some(_)) if a >= size => RangeAnswer::Unsatisfiable,
            (Some(a), Some(b)) => RangeAnswer::Partial { start: a, end: b.min(size - 1) },
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::RangeAnswer::*;
    use super::*;

    #[test]
    fn single_ranges() {
        assert_eq!(resolve(None, 10), Full);
        assert_eq!(resolve(Some("bytes=0-"), 10), Partial { start: 0, end: 9 });
        assert_eq!(resolve(Some("bytes=2-4"), 10), Partial { start: 2, end: 4 });
        assert_eq!(resolve(Some("bytes=2-400"), 10), Partial { start: 2, end: 9 });
        assert_eq!(resolve(Some("bytes=-3"), 10), Partial { start: 7, end: 9 });
        assert_eq!(resolve(Some("bytes=-30"), 10), Partial { start: 0, end: 9 });
    }

    #[test]
    fn unsatisfiable() {
        assert_eq!(resolve(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=10-20"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(resolve(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[test]
    fn ignored() {
        for h in ["items=0-1", "bytes=5-2", "bytes=a-b", "bytes=-", "bytes=0-1,3-4", "bytes=99999999999999999999999-"] {
            assert_eq!(resolve(Some(h), 10), Full, "{h}");
        }
    }
}
