//! Cluster mode on Redis (`switchyard serve --redis URL --node-id NAME`; the design is in
//! docs/cluster.md): the log every node reads ([`log`]), the sequencer that decides every
//! command and writes it ([`sequencer`]), and the replica that applies it to a node's hub
//! ([`node`]). The hub's side is `hub/clustered.rs` and `hub/replica.rs`.

pub mod log;
pub mod node;
pub mod sequencer;
