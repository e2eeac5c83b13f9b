//! Test support: images.
