//! Test harness: real processes (wharf, docker-registry, containerd) and an in-process fake upstream.

pub mod cluster;
pub mod containerd;
pub mod containerd_files;
pub mod data_dir;
pub mod fake_s3;
pub mod fake_upstream;
pub mod images;
pub mod moto;
pub mod registry;
pub mod s3s;
pub mod tools;
pub mod wharf;
