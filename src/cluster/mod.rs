//! Cluster mode on Redis, being built (issue 10; the design and the order of the work are in
//! docs/cluster.md). Nothing here is wired into the server yet: so far, the log that every
//! node will read and the sequencer that decides commands and writes it.

pub mod log;
pub mod node;
pub mod sequencer;
