//! Test support: containerd.
