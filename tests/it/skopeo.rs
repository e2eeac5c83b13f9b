//! Tests: skopeo.
