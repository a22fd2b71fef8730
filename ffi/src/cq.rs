//! Completion queues, their completion channel (an fd an event loop can wait on), and work
//! completions turned into Rust values.

use std::ffi::CStr;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::Arc;

use rdma_sys::*;

use crate::device::{Context, ContextInner};
use crate::error::{call, last_errno, CompletionError, VerbsError};

pub(crate) struct CqInner {
    pub(crate) cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    ctx: Arc<ContextInner>,
}

// SAFETY: verbs objects may be used from any thread; pointers are only freed in Drop.
unsafe impl Send for CqInner {}
// SAFETY: as above.
unsafe impl Sync for CqInner {}

impl Drop for CqInner {
    fn drop(&mut self) {
        // SAFETY: queue pairs hold an Arc to their CQs, so none uses this CQ any more; the CQ
        // goes before its channel, as libibverbs requires.
        unsafe {
            ibv_destroy_cq(self.cq);
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}

/// A completion queue.
#[derive(Clone)]
pub struct CompletionQueue {
    pub(crate) inner: Arc<CqInner>,
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionQueue")
            .field("device", &self.inner.ctx.name)
            .field("channel", &!self.inner.channel.is_null())
            .finish()
    }
}

/// What a successful work request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// A SEND went out.
    Send,
    /// An RDMA WRITE (with or without immediate) went out.
    RdmaWrite,
    /// A SEND arrived into a posted receive.
    Recv {
        /// Bytes received.
        len: u32,
        /// The rkey the send invalidated ([`SendOp::SendWithInv`](crate::SendOp::SendWithInv)),
        /// if it did.
        invalidated: Option<u32>,
    },
    /// A peer's RDMA_WRITE_WITH_IMM landed; it consumed a posted receive.
    RecvRdmaWithImm {
        /// Bytes written.
        len: u32,
        /// The immediate, in host order.
        imm: u32,
    },
    /// A memory window was bound.
    Bind,
    /// An rkey was invalidated.
    LocalInv,
    /// Another opcode (reported as its `ibv_wc_opcode` value).
    Other(u32),
}

/// One work completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The id the request was posted with.
    pub wr_id: u64,
    /// The queue pair it belongs to.
    pub qp_num: u32,
    /// What happened, or why it failed.
    pub result: Result<Completed, CompletionError>,
}

impl Context {
    /// Creates a completion queue of at least `entries` entries, with a completion channel when
    /// `with_channel` is set (see [`CompletionQueue::fd`]).
    pub fn create_cq(
        &self,
        entries: i32,
        with_channel: bool,
    ) -> Result<CompletionQueue, VerbsError> {
        let channel = if with_channel {
            // SAFETY: the context is open.
            let ch = unsafe { ibv_create_comp_channel(self.inner.ctx) };
            if ch.is_null() {
                return Err(call("ibv_create_comp_channel", self.name(), last_errno()));
            }
            // Non-blocking, so an event loop can drain it without stalling.
            // SAFETY: `ch` is a live channel and its fd an open descriptor.
            let fd = unsafe { (*ch).fd };
            // SAFETY: fcntl on a valid fd with valid flags.
            let rc = unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            };
            if rc < 0 {
                let errno = last_errno();
                // SAFETY: destroyed once, nothing uses it yet.
                unsafe { ibv_destroy_comp_channel(ch) };
                return Err(call(
                    "fcntl(O_NONBLOCK) on the completion channel",
                    self.name(),
                    errno,
                ));
            }
            ch
        } else {
            std::ptr::null_mut()
        };
        // SAFETY: the context is open; `channel` is null or a live channel of this context.
        let cq =
            unsafe { ibv_create_cq(self.inner.ctx, entries, std::ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let errno = last_errno();
            if !channel.is_null() {
                // SAFETY: destroyed once; no CQ uses it.
                unsafe { ibv_destroy_comp_channel(channel) };
            }
            return Err(call(
                format!("ibv_create_cq({entries})"),
                self.name(),
                errno,
            ));
        }
        Ok(CompletionQueue {
            inner: Arc::new(CqInner {
                cq,
                channel,
                ctx: self.inner.clone(),
            }),
        })
    }
}

impl CompletionQueue {
    /// Takes up to `max` completions, appending them to `out`; returns how many.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        const BATCH: usize = 16;
        let mut total = 0;
        while total < max {
            // SAFETY: ibv_wc is plain data; zeroed is valid and ibv_poll_cq fills what it returns.
            let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
            let want = (max - total).min(BATCH) as i32;
            // SAFETY: the CQ is live and `wcs` has room for `want` entries.
            let n = unsafe { ibv_poll_cq(self.inner.cq, want, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(call("ibv_poll_cq", &self.inner.ctx.name, -n));
            }
            for wc in &wcs[..n as usize] {
                out.push(convert(wc));
            }
            total += n as usize;
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    /// The completion channel's fd (non-blocking), readable after [`arm`](Self::arm) once a
    /// completion arrives; `None` without a channel.
    pub fn fd(&self) -> Option<RawFd> {
        // SAFETY: the channel, when present, lives as long as the CQ.
        (!self.inner.channel.is_null()).then(|| unsafe { (*self.inner.channel).fd })
    }

    /// Asks for one event on the channel at the next completion.
    pub fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is live.
        let rc = unsafe { ibv_req_notify_cq(self.inner.cq, 0) };
        if rc != 0 {
            return Err(call("ibv_req_notify_cq", &self.inner.ctx.name, rc));
        }
        Ok(())
    }

    /// Takes and acknowledges every pending channel event; returns how many there were. Call
    /// when the fd is readable, then [`arm`](Self::arm) again and [`poll`](Self::poll).
    pub fn ack_events(&self) -> Result<u32, VerbsError> {
        if self.inner.channel.is_null() {
            return Ok(0);
        }
        let mut n = 0u32;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut ctx = std::ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; both out-pointers are valid.
            let rc = unsafe { ibv_get_cq_event(self.inner.channel, &mut cq, &mut ctx) };
            if rc != 0 {
                let errno = last_errno();
                if errno == libc::EAGAIN {
                    break;
                }
                return Err(call("ibv_get_cq_event", &self.inner.ctx.name, errno));
            }
            n += 1;
        }
        if n > 0 {
            // SAFETY: acknowledges exactly the events taken above, on the CQ they were for.
            unsafe { ibv_ack_cq_events(self.inner.cq, n) };
        }
        Ok(n)
    }
}

/// The rkey a received send invalidated, if it did.
///
/// libibverbs says so with `IBV_WC_WITH_INV` (bit 3). Providers that complete through the kernel
/// (rxe, siw) pass on the kernel's own flag, `IB_WC_WITH_INVALIDATE`, which is bit 2 (where
/// libibverbs has `IBV_WC_IP_CSUM_OK`): verified on rxe, where a SEND_WITH_INV completes with
/// flags 0x5 and the key in the union. So either bit counts, unless the receive carried an
/// immediate (the union then holds that). A receiver checks the key against those it lent: a
/// send that invalidated nothing cannot name a key it holds.
fn invalidated(wc: &ibv_wc) -> Option<u32> {
    const WITH_IMM: u32 = ibv_wc_flags::IBV_WC_WITH_IMM.0;
    const WITH_INV: u32 = ibv_wc_flags::IBV_WC_WITH_INV.0;
    const KERNEL_WITH_INVALIDATE: u32 = 1 << 2;
    let flags = wc.wc_flags;
    // SAFETY: both union members are a u32; without an immediate it is the rkey.
    let rkey = unsafe { wc.imm_data_invalidated_rkey_union.invalidated_rkey };
    (flags & WITH_IMM == 0 && flags & (WITH_INV | KERNEL_WITH_INVALIDATE) != 0).then_some(rkey)
}

fn convert(wc: &ibv_wc) -> Completion {
    let result = if wc.status == ibv_wc_status::IBV_WC_SUCCESS {
        Ok(match wc.opcode {
            ibv_wc_opcode::IBV_WC_SEND => Completed::Send,
            ibv_wc_opcode::IBV_WC_RDMA_WRITE => Completed::RdmaWrite,
            ibv_wc_opcode::IBV_WC_RECV => Completed::Recv {
                len: wc.byte_len,
                invalidated: invalidated(wc),
            },
            ibv_wc_opcode::IBV_WC_BIND_MW => Completed::Bind,
            ibv_wc_opcode::IBV_WC_LOCAL_INV => Completed::LocalInv,
            ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Completed::RecvRdmaWithImm {
                len: wc.byte_len,
                // SAFETY: both union members are a u32; the immediate travels big-endian.
                imm: u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }),
            },
            other => Completed::Other(other),
        })
    } else {
        // On error completions opcode and byte_len are undefined: only the status is read.
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any status.
        let text = unsafe { CStr::from_ptr(ibv_wc_status_str(wc.status)) };
        Err(CompletionError {
            wr_id: wc.wr_id,
            status: wc.status,
            status_text: text.to_string_lossy().into_owned(),
        })
    };
    Completion {
        wr_id: wc.wr_id,
        qp_num: wc.qp_num,
        result,
    }
}
