//! Test support: fake_upstream.
