//! wharf's integration tests: one binary, so there is one link step (see `support/`).

mod support;

mod access;
mod admin;
mod api;
mod bucket;
mod chaos;
mod cluster;
mod cluster_membership;
mod coalesce;
mod containerd;
mod dashboard;
mod deploy;
mod disk_full;
mod faults;
mod flapping;
mod gc;
mod hostile;
mod lifecycle;
mod metrics;
mod node_setup;
mod parallel_fill;
mod prefetch;
mod range;
mod restart;
mod runtime;
mod server;
mod single_flight;
mod skopeo;
mod warm;
