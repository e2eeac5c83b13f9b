//! Tests: single_flight.
