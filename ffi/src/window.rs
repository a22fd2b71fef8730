//! Memory windows (type 2): remote keys over a range of a registered region, bound and
//! invalidated through a queue pair's send queue.
//!
//! A region registered with [`Access::MW_BIND`] and without remote rights gives peers nothing by
//! itself. Binding a window over part of it ([`QueuePair::post_bind`]) hands out a fresh rkey for
//! that part; invalidating the window (by the owner, [`QueuePair::post_local_invalidate`], or by
//! the peer with its last message, [`SendOp::SendWithInv`](crate::SendOp::SendWithInv)) takes it
//! back: a write with the old rkey then fails at the owner's NIC with a remote access error,
//! without touching memory. A type 2 window is tied to the queue pair that bound it, and must be
//! invalid before it is bound again.

use std::fmt;
use std::sync::Arc;

use rdma_sys::*;

use crate::error::{call, last_errno, VerbsError};
use crate::memory::{Access, MemoryRegion, PdInner, ProtectionDomain, RegisteredMemory};
use crate::qp::QueuePair;

/// A type 2 memory window. Deallocated (and so invalidated) on Drop: declare it before the
/// region it is bound over, so it goes first.
pub struct MemoryWindow {
    mw: *mut ibv_mw,
    /// The rkey of the last bind (the allocation's before the first): the low 8 bits change with
    /// every bind, the rest never.
    rkey: u32,
    _pd: Arc<PdInner>,
}

// SAFETY: verbs objects may be used from any thread; the pointer is only freed in Drop.
unsafe impl Send for MemoryWindow {}
// SAFETY: shared access only reads the rkey copy.
unsafe impl Sync for MemoryWindow {}

impl fmt::Debug for MemoryWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryWindow")
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl ProtectionDomain {
    /// Allocates a type 2 memory window (unbound: it grants nothing until bound).
    pub fn alloc_mw(&self) -> Result<MemoryWindow, VerbsError> {
        // SAFETY: the PD is live; the wrapper checks the provider implements alloc_mw and sets
        // errno to EOPNOTSUPP when it does not.
        let mw = unsafe { ibv_alloc_mw(self.inner.pd, ibv_mw_type::IBV_MW_TYPE_2) };
        let mw = match mw {
            Some(mw) if !mw.is_null() => mw,
            _ => {
                return Err(call(
                    "ibv_alloc_mw(type 2)",
                    &self.inner.ctx.name,
                    last_errno(),
                ))
            }
        };
        Ok(MemoryWindow {
            mw,
            // SAFETY: `mw` is a live window just allocated.
            rkey: unsafe { (*mw).rkey },
            _pd: self.inner.clone(),
        })
    }
}

impl MemoryWindow {
    /// The rkey of the last bind: what the peer must use, while the window is bound.
    pub fn rkey(&self) -> u32 {
        self.rkey
    }

    /// The rkey the next bind will give (only the low 8 bits differ from the last).
    pub fn next_rkey(&self) -> u32 {
        (self.rkey & !0xff) | (self.rkey.wrapping_add(1) & 0xff)
    }
}

impl Drop for MemoryWindow {
    fn drop(&mut self) {
        // SAFETY: deallocated exactly once; its PD is still alive (held by this struct).
        unsafe { ibv_dealloc_mw(self.mw) };
    }
}

impl QueuePair {
    /// Posts a bind of `window` over `region[range]` with the rights `access` (e.g.
    /// [`Access::REMOTE_WRITE`]), signalled with `wr_id`; returns the window's new rkey, valid
    /// for peers of this queue pair once the bind has executed (work requests posted after it on
    /// this queue pair, e.g. a write telling the peer the key, execute after it). The window
    /// must be invalid (never bound, or invalidated since): binding a valid type 2 window fails
    /// and sends the queue pair to the error state.
    ///
    /// # Safety
    /// Peers may write `region[range]` until the window is invalidated or dropped: the caller
    /// must keep the memory valid for that (drop the window before the region) and read it only
    /// when its protocol says the peer is done.
    pub unsafe fn post_bind<M: RegisteredMemory>(
        &self,
        wr_id: u64,
        window: &mut MemoryWindow,
        region: &MemoryRegion<M>,
        range: std::ops::Range<usize>,
        access: Access,
    ) -> Result<u32, VerbsError> {
        let rkey = window.next_rkey();
        // SAFETY: plain data; the bind fields are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.bind_mw_tso_union.bind_mw = bind_mw_t {
            mw: window.mw,
            rkey,
            bind_info: ibv_mw_bind_info {
                mr: region.raw(),
                addr: region.address_of(&range),
                length: range.len() as u64,
                mw_access_flags: access.bits(),
            },
        };
        self.post(&mut wr, "ibv_post_send(BIND_MW)")?;
        window.rkey = rkey;
        // Providers name the window in the next bind by the key it has now (rxe checks it against
        // the kernel's, which this bind sets), and nothing else updates the user-space copy.
        // SAFETY: the window is live; the field is plain data that only this thread touches.
        unsafe { (*window.mw).rkey = rkey };
        Ok(rkey)
    }

    /// Posts an invalidation of `rkey` (a window's, bound through this queue pair), signalled
    /// with `wr_id`: once it completes, peers' writes with that key fail. Safe: it only takes
    /// rights away.
    pub fn post_local_invalidate(&self, wr_id: u64, rkey: u32) -> Result<(), VerbsError> {
        // SAFETY: plain data; an invalidation names no local buffer.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = ibv_wr_opcode::IBV_WR_LOCAL_INV;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
        self.post(&mut wr, "ibv_post_send(LOCAL_INV)")
    }
}
