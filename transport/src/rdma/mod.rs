//! The RDMA verbs transport: RC queue pairs, one-sided RDMA_WRITE_WITH_IMM of each gradient part
//! straight into the server's registered slot and of each model part back into the worker's
//! registered buffer. Its own [`Transport`](crate::Transport) implementation, composing the TCP
//! channel ([`crate::channel`]) for control.
//!
//! The TCP connection stays: it carries the handshake, the exchange of queue-pair numbers, GIDs,
//! addresses and rkeys ([`crate::protocol::RdmaParams`]), and it is the liveness channel: when it
//! drops, the peer is gone and its queue pair is torn down. The server registers its arena once
//! (local access, the source of model writes) and each worker's block of slots on its own, with
//! no remote rights: a worker writes a slot only through a memory window the server binds over
//! that one slot when it lends it, and its push invalidates the window as it arrives
//! ([`crate::protocol::rdma`]). So a slot is writable only while it is the worker's, a worker
//! reaches nothing but its own lent slots, and models are never remotely writable.
//!
//! This module posts sends, which is `unsafe` (the NIC reads the buffer until the completion):
//! every post says why its buffer outlives the request.

mod client;
mod peer;
pub mod pingpong;
mod server;

pub use client::{RdmaClient, Upgrade};
/// The verbs layer this transport is built on, for tools and tests that speak RDMA themselves.
pub use hetsync_ffi as verbs;
pub use server::RdmaServer;

use hetsync_ffi::{Context, Gid, PathConfig, VerbsError};

/// Which device, port and GID to use.
#[derive(Debug, Clone, Default)]
pub struct RdmaConfig {
    /// The device (`None`: the first one).
    pub device: Option<String>,
    /// The GID index (`None`: the RoCE v2 IPv4 GID, else index 0).
    pub gid_index: Option<u8>,
}

/// Part writes (a stamp and the data) a queue pair may have in flight; more wait in a backlog.
pub(crate) const MAX_INFLIGHT: u32 = 128;
/// Send queue depth: up to three work requests per part write (the server's bind, stamp and
/// data; the worker's data and stamp).
pub(crate) const SEND_DEPTH: u32 = 3 * MAX_INFLIGHT;
/// Receives the server keeps posted per worker, one per push it has not taken yet (a worker
/// has at most [`MAX_INFLIGHT`] in flight; more wait, retried by the NIC, until it re-posts: that
/// is the flow control). A worker keeps one per part, or this many if more.
pub(crate) const RECV_DEPTH: u32 = MAX_INFLIGHT + 8;
/// Work-request id bit marking a write whose completion only says it went: the server's stamp
/// write, the worker's data write (the send after it is what counts).
pub(crate) const STAMP_WR: u64 = 1 << 31;
/// Work-request id bit marking the server's bind of a window (lending a slot).
pub(crate) const BIND_WR: u64 = 1 << 30;
/// The port every queue pair uses.
pub(crate) const PORT: u8 = 1;

/// An opened device with its active port, source GID and path.
#[derive(Debug)]
pub struct Local {
    pub(crate) ctx: Context,
    pub(crate) gid: Gid,
    pub(crate) lid: u16,
    pub(crate) path: PathConfig,
}

impl Local {
    /// Opens the device `cfg` names and checks its port is active.
    pub fn open(cfg: &RdmaConfig) -> Result<Local, VerbsError> {
        let ctx = Context::open(cfg.device.as_deref())?;
        let port = ctx.active_port(PORT)?;
        let (gid_index, gid) = match cfg.gid_index {
            Some(i) => (i, ctx.gid(PORT, i)?),
            None => match ctx.roce_v2_ipv4_gid(PORT) {
                Ok(found) => found,
                // InfiniBand: the port GID at index 0 (routing with a GRH works within a subnet).
                Err(e) => (0, ctx.gid(PORT, 0).map_err(|_| e)?),
            },
        };
        Ok(Local {
            path: PathConfig {
                port: PORT,
                gid_index,
                mtu: port.active_mtu,
                global: true,
            },
            gid,
            lid: port.lid,
            ctx,
        })
    }

    /// The device, port and GID, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} port {} GID[{}] {}",
            self.ctx.name(),
            PORT,
            self.path.gid_index,
            self.gid
        )
    }
}

/// A packet sequence number that differs between connections.
pub(crate) fn random_psn() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (t ^ std::process::id().rotate_left(16)) & 0xff_ffff
}
