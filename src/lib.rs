//! wharf: a pull-through caching OCI registry mirror.
//!
//! # Layout
//! - [`oci`]: names, references, digests, media types (pure, no I/O).
//! - [`upstream`]: registry clients, token auth, routing a request to a configured registry.
//! - [`cache`]: the blob store, in-flight fills and their origins, manifests and tags, sled metadata.
//! - [`cluster`]: the other wharf instances: membership, ownership by rendezvous hashing, the peer client.
//! - [`pages`]: page-cache mappings of blob files (a leaf).
//! - [`bucket`]: the shared S3-compatible bucket below the node's disk.
//! - [`api`]: HTTP routes, OCI errors, `Range`.
//! - [`warm`]: the warm list and the image walk; [`prefetch`]: `wharf prefetch`; [`admin`]: the admin API.
//! - [`config`], [`state`], [`server`], [`telemetry`]: wiring.
//!
//! # A blob's path
//! `GET /v2/<name>/blobs/<digest>?ns=…` → `api::path` parses from the right → `upstream::Upstreams::route`
//! picks the registry → `cache::Cache::blob` answers hit, joins a running fill, or starts one (from the owner
//! peer when the cluster tier is on and another node owns the digest, else from the upstream; written to a
//! temporary file while hashing) → `cache::reader` streams from the file, following the fill →
//! at the end the fill verifies size and digest and renames the file into `blobs/sha256/<2 hex>/<hex>`.

pub mod access;
pub mod admin;
pub mod api;
pub mod bucket;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod node_setup;
pub mod oci;
pub mod pages;
pub mod prefetch;
pub mod runtime;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod upstream;
pub mod warm;
