//! Het-Sync: a straggler-tolerant parameter server for distributed training.
//!
//! Workers push gradients; the server sums them with SIMD over an mmapped region, applies the
//! update and returns the model. A synchronisation policy ([`sync`]) decides when a round closes:
//! `naive` waits for every worker, the Het-Sync `timeout` barrier closes when everyone has pushed
//! or a timeout after the round's first push expires, with whatever arrived.
//!
//! Layers, each testable alone: [`protocol`] (wire format, pure), [`sync`] (policies, pure, fed
//! with `now`), [`engine`] (SIMD kernels and the optimizer), transports behind
//! [`hetsync_transport::Transport`], and the glue in [`server`] and [`worker`].

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod engine;
pub mod experiment;
pub mod server;
pub mod sync;
pub mod worker;

pub use hetsync_transport::protocol;
pub use hetsync_transport::Rank;
