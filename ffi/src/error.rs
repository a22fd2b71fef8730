//! Errors of the verbs layer: each names the call, the device and the errno, with the usual fix
//! when there is one.

use std::io;

/// A failed verbs operation.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// This machine has no usable RDMA device (no kernel support, no device, or none by that name).
    #[error("no RDMA here: {0}")]
    NoDevice(String),
    /// A verbs call failed.
    #[error("{op} on {device} failed: {source}{hint}")]
    Call {
        /// The call, e.g. "ibv_reg_mr of 64 MiB".
        op: String,
        /// The device name.
        device: String,
        /// The errno.
        #[source]
        source: io::Error,
        /// What usually fixes it.
        hint: &'static str,
    },
    /// The port is not active.
    #[error("port {port} of {device} is {state}, not active (check the cable or link with `ibv_devinfo`; on RoCE, that the netdev is up)")]
    PortDown {
        /// The device.
        device: String,
        /// The port.
        port: u8,
        /// Its state.
        state: String,
    },
    /// No usable GID at that index or none with an IPv4 address.
    #[error("{device} port {port}: {what} (list the GIDs with `show_gids` or /sys/class/infiniband/{device}/ports/{port}/gids/; pick one with --gid-index)")]
    NoGid {
        /// The device.
        device: String,
        /// The port.
        port: u8,
        /// What was missing.
        what: String,
    },
    /// A work request completed with an error.
    #[error(transparent)]
    Completion(#[from] CompletionError),
}

/// A work request that completed with an error status. On error completions the opcode and
/// length are undefined, so only the request's id and the status are reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("work request {wr_id} failed: {status_text} (status {status})")]
pub struct CompletionError {
    /// The id the request was posted with.
    pub wr_id: u64,
    /// The `ibv_wc_status` code.
    pub status: u32,
    /// libibverbs' description of the status.
    pub status_text: String,
}

impl CompletionError {
    /// The remote side refused the access (out of the registered range, wrong rkey or rights).
    pub fn is_remote_access(&self) -> bool {
        self.status == rdma_sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR
    }

    /// The request was flushed because its queue pair went to the error state.
    pub fn is_flushed(&self) -> bool {
        self.status == rdma_sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }
}

/// The fix users hit most often for an errno of a given call.
pub(crate) fn hint(op: &str, errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::ENOMEM) if op.starts_with("ibv_reg_mr") => {
            " (the locked-memory limit is too low: run `ulimit -l unlimited` in the job, or raise memlock in /etc/security/limits.conf)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (no permission on /dev/infiniband/uverbs*: check the device's group, or run as a user allowed to use RDMA)"
        }
        Some(libc::ETIMEDOUT) if op.contains("modify_qp") => {
            " (the path to the peer is wrong: check the GID index and that both ends are on the same fabric)"
        }
        _ => "",
    }
}

pub(crate) fn call(op: impl Into<String>, device: &str, errno: i32) -> VerbsError {
    let op = op.into();
    let hint = hint(&op, Some(errno));
    VerbsError::Call {
        op,
        device: device.to_string(),
        source: io::Error::from_raw_os_error(errno),
        hint,
    }
}

/// The errno of a call that returned NULL (or -1) and set `errno`.
pub(crate) fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
