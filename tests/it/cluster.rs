//! The cluster tier with real processes on loopback: three wharf instances on 127.0.0.2–4, each with its own
//! data directory, a real or fake upstream, and clients spread over the nodes.
