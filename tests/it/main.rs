//! wharf's integration tests: one binary, so there is one link step (see `support/`).

mod support;

mod api;
mod containerd;
mod faults;
mod lifecycle;
mod parallel_fill;
mod range;
mod restart;
mod single_flight;
mod skopeo;
