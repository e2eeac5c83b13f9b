//! Tests: containerd.
