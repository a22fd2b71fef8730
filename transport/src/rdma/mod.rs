//! The RDMA verbs transport: RC queue pairs, one-sided RDMA_WRITE_WITH_IMM of gradients straight
//! into the server's registered slots and of the model back into the worker's registered buffer.
//!
//! The TCP connection stays: it carries the handshake, the exchange of queue-pair numbers, GIDs,
//! addresses and rkeys ([`crate::protocol::RdmaParams`]), and it is the liveness channel: when it
//! drops, the peer is gone and its queue pair is torn down. Each worker's slot is registered on its
//! own, so a worker's rkey reaches its slot and nothing else; the model is never remotely writable.
//!
//! This module posts sends, which is `unsafe` (the NIC reads the buffer until the completion):
//! every post says why its buffer outlives the request.

mod client;
mod server;

pub use client::{RdmaClient, Upgrade};
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

/// Receives kept posted per queue pair (each WRITE_WITH_IMM consumes one).
pub(crate) const RECV_DEPTH: u32 = 32;
/// The port every queue pair uses.
pub(crate) const PORT: u8 = 1;

/// An opened device with its active port, source GID and path.
/// An opened device with its active port and source GID.
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
