//! sonde aggregator: one module per stage a batch passes through.
//! ingest (QUIC, auth, decode) → store (ClickHouse) → api (HTTP).

pub mod alert;
pub mod api;
pub mod config;
pub mod console;
pub mod detect;
pub mod ingest;
pub mod metrics;
pub mod store;
