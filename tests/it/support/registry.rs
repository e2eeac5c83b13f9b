//! Test support: registry.
