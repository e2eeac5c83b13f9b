//! Test support: wharf.
