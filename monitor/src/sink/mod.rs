//! Sinks of the monitor's output besides stdout: ClickHouse history (flows, credential
//! observations, alerts) with an on-disk spool, and the cross-node credential bindings kept
//! in it.

pub mod bindings;
pub mod clickhouse;
pub mod rows;
pub mod schema;
pub mod spool;

pub use bindings::{RemoteBinding, SharedBindings};
pub use clickhouse::{ClickHouseArgs, ClickHouseSink, SinkConfig, SinkRuntime, SinkStats};
