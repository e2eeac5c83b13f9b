//! Test support: tools.
