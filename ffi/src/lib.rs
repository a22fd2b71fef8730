//! Safe owning wrappers over libibverbs (through `rdma-sys`): the only crate of Het-Sync with
//! `unsafe` verbs calls.
//!
//! What the RDMA transport needs and no more: devices, ports and GIDs ([`Context`]), protection
//! domains and memory regions over memory the region owns ([`MemoryRegion`]), completion queues
//! with an optional channel fd for an event loop ([`CompletionQueue`]), and reliable-connected
//! queue pairs with RDMA WRITE, WRITE_WITH_IMM, SEND and RECV ([`QueuePair`]), and memory windows
//! that lend a range to a peer and take it back ([`MemoryWindow`]).
//!
//! Ownership follows rust-ibverbs: every object holds an `Arc` to its parent, so parents are
//! released last (QP, then CQ and MR, then PD, then the context). Each `unsafe` block says why
//! it is sound. Errors name the call, the device and the errno, with the usual fix.

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unsafe_op_in_unsafe_fn)]

mod cq;
mod device;
mod error;
mod memory;
mod qp;
mod window;

pub use cq::{Completed, Completion, CompletionQueue};
pub use device::{device_names, Context, Gid, PortInfo};
pub use error::{CompletionError, VerbsError};
pub use memory::{
    Access, ExternalMemory, MemoryRegion, ProtectionDomain, RegisteredMemory, RemoteBuffer,
};
pub use qp::{Endpoint, PathConfig, QpCaps, QueuePair, SendOp};
pub use window::MemoryWindow;
