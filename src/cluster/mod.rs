//! Cluster mode on Redis, being built (issue 10; the design and the order of the work are in
//! docs/cluster.md). Nothing here is wired into the server yet: so far, the log that every
//! node will read.

pub mod log;
