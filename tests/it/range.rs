//! Tests: range.
