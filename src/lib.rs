//! Het-Sync: a straggler-tolerant parameter server for distributed training.
//!
//! Workers push gradients; the server sums them with SIMD over an mmapped arena, applies the
//! update and returns the model. A job is a list of tensors (keys); each travels and synchronises
//! as parts of at most the server's partition size, so the server sums one part while the next is
//! still arriving. A synchronisation policy per part ([`sync`]) decides when a round closes:
//! `naive` waits for every worker, the Het-Sync `timeout` barrier closes when everyone has pushed
//! or a timeout after the round's first push expires, with whatever arrived.
//!
//! Layers, each testable alone: [`protocol`] (wire format, pure), [`sync`] (policies, pure, fed
//! with `now`), [`engine`] (SIMD kernels and the optimizer over plain slices), transports behind
//! [`hetsync_transport::Transport`], the event loop in [`server`], and the worker API in
//! [`client`] with the simulated worker of [`worker`] on top.

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod client;
pub mod engine;
pub mod experiment;
pub mod roundtrip;
pub mod server;
pub mod swarm;
pub mod sync;
pub mod worker;

pub use hetsync_transport::protocol;

/// A worker's rank, `0..workers`.
pub type Rank = u32;
/// A part's index: the unit the policies synchronise (a tensor is one or more parts).
pub type Key = u32;
/// A round of a part, or a worker's clock.
pub type Clock = u64;

// The sync core and the engine use the vocabulary above, never a transport type; the wire uses the
// same widths. These fail to compile if the two ever drift apart.
const _: fn(hetsync_transport::Rank) -> Rank = |r| r;
const _: fn(hetsync_transport::Key) -> Key = |k| k;
const _: fn(hetsync_transport::Clock) -> Clock = |c| c;
