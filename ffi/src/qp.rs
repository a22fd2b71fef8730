//! Reliable-connected queue pairs: creation, the INIT -> RTR -> RTS transitions, and posting.

use std::fmt;
use std::sync::Arc;

use rdma_sys::*;

use crate::cq::{CompletionQueue, CqInner};
use crate::device::Gid;
use crate::error::{call, last_errno, VerbsError};
use crate::memory::{MemoryRegion, PdInner, ProtectionDomain, RegisteredMemory, RemoteBuffer};

/// How many work requests a queue pair can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding sends (writes count as sends).
    pub max_send: u32,
    /// Outstanding receives.
    pub max_recv: u32,
}

impl Default for QpCaps {
    fn default() -> Self {
        QpCaps {
            max_send: 64,
            max_recv: 64,
        }
    }
}

/// What one side of a connection tells the other (out of band, e.g. over TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number it will send.
    pub psn: u32,
    /// Its GID (RoCE, or InfiniBand across subnets).
    pub gid: Gid,
    /// Its LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
}

/// Where and how a queue pair sends: the local port, GID index and path MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathConfig {
    /// Local port (from 1).
    pub port: u8,
    /// Local GID index used as the source of GRH-routed packets.
    pub gid_index: u8,
    /// Path MTU as the `ibv_mtu` enum (use the port's active MTU).
    pub mtu: u32,
    /// Route with a global header (RoCE always; InfiniBand across subnets).
    pub global: bool,
}

/// What to post on the send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// Write into the peer's memory; the peer is not notified.
    Write,
    /// Write into the peer's memory and consume one of its posted receives, carrying `imm`.
    WriteWithImm(u32),
    /// Two-sided send into the peer's next posted receive buffer.
    Send,
    /// A send that also invalidates the peer's memory window with this rkey as it arrives (the
    /// peer's receive completion names the key): the sender gives back its right to write.
    SendWithInv(u32),
}

/// A reliable-connected queue pair. Destroyed before its CQs and PD (it holds them).
pub struct QueuePair {
    qp: *mut ibv_qp,
    device: String,
    _pd: Arc<PdInner>,
    _cqs: [Arc<CqInner>; 2],
}

// SAFETY: verbs objects may be used from any thread; the pointer is only freed in Drop.
unsafe impl Send for QueuePair {}
// SAFETY: posting from several threads is allowed by libibverbs.
unsafe impl Sync for QueuePair {}

impl fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueuePair")
            .field("device", &self.device)
            .field("qpn", &self.qpn())
            .finish()
    }
}

impl ProtectionDomain {
    /// Creates an RC queue pair whose sends complete on `send_cq` and receives on `recv_cq`.
    pub fn create_rc_qp(
        &self,
        send_cq: &CompletionQueue,
        recv_cq: &CompletionQueue,
        caps: QpCaps,
    ) -> Result<QueuePair, VerbsError> {
        // SAFETY: plain data; zeroed is a valid start for the fields set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.inner.cq;
        init.recv_cq = recv_cq.inner.cq;
        init.cap.max_send_wr = caps.max_send;
        init.cap.max_recv_wr = caps.max_recv;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        // SAFETY: the PD and CQs are live (and kept alive by the returned QP).
        let qp = unsafe { ibv_create_qp(self.inner.pd, &mut init) };
        if qp.is_null() {
            return Err(call(
                "ibv_create_qp(RC)",
                &self.inner.ctx.name,
                last_errno(),
            ));
        }
        Ok(QueuePair {
            qp,
            device: self.inner.ctx.name.clone(),
            _pd: self.inner.clone(),
            _cqs: [send_cq.inner.clone(), recv_cq.inner.clone()],
        })
    }
}

impl QueuePair {
    /// This queue pair's number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: the QP is live until Drop.
        unsafe { (*self.qp).qp_num }
    }

    fn modify(
        &self,
        what: &str,
        attr: &mut ibv_qp_attr,
        mask: ibv_qp_attr_mask,
    ) -> Result<(), VerbsError> {
        // SAFETY: the QP is live and `attr` holds every field `mask` names.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(call(format!("ibv_modify_qp to {what}"), &self.device, rc));
        }
        Ok(())
    }

    /// Connects to `remote`: INIT (allowing remote writes into this side's regions), RTR, RTS.
    /// `local_psn` must be what this side told the peer as its [`Endpoint::psn`].
    pub fn connect(
        &mut self,
        path: PathConfig,
        local_psn: u32,
        remote: &Endpoint,
    ) -> Result<(), VerbsError> {
        use ibv_qp_attr_mask as m;
        // SAFETY (all three): plain data; zeroed is valid, and each step sets what its mask names.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = path.port;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        self.modify(
            "INIT",
            &mut a,
            m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS,
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = path.mtu;
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = path.port;
        if path.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: remote.gid.0 };
            a.ah_attr.grh.sgid_index = path.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            "RTR",
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
        )?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        // 7 is "retry forever": a receiver that has not re-posted its receives yet (the server
        // busy, with more pushes delivered than receives posted) holds the sender back rather
        // than failing it. This is the flow control between the two sides; a peer that never
        // re-posts is dropped by the other side's own bounds (the server's model-write drain).
        a.rnr_retry = 7;
        a.sq_psn = local_psn;
        a.max_rd_atomic = 1;
        self.modify(
            "RTS",
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Posts a receive with no buffer: enough to take one RDMA_WRITE_WITH_IMM notification.
    /// Safe: the NIC touches no local memory for it.
    pub fn post_recv_imm(&self, wr_id: u64) -> Result<(), VerbsError> {
        // SAFETY: plain data; a receive with no scatter entries.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` is a valid single request with no buffers.
        let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(call("ibv_post_recv", &self.device, rc));
        }
        Ok(())
    }

    /// Posts a receive into `local[range]`, for a peer's SEND; its completion carries `wr_id`.
    ///
    /// # Safety
    /// The region must stay alive, and `local[range]` unread and unwritten by the program, until
    /// that completion has been polled: the NIC writes it asynchronously.
    pub unsafe fn post_recv<M: RegisteredMemory>(
        &self,
        wr_id: u64,
        local: &MemoryRegion<M>,
        range: std::ops::Range<usize>,
    ) -> Result<(), VerbsError> {
        let mut sge = scatter_entry(local, range, &self.device)?;
        // SAFETY: plain data; one scatter entry set below.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` and `sge` are valid for the call; the caller keeps the
        // buffer valid until the completion.
        let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(call("ibv_post_recv", &self.device, rc));
        }
        Ok(())
    }

    /// Posts `op` of `local[range]` (to `remote` at byte `remote_offset` for writes), signalled:
    /// a completion with `wr_id` follows on the send CQ.
    ///
    /// # Safety
    /// The region must stay alive, and `local[range]` unchanged, until that completion has been
    /// polled: the NIC reads it asynchronously.
    pub unsafe fn post_send<M: RegisteredMemory>(
        &self,
        wr_id: u64,
        op: SendOp,
        local: &MemoryRegion<M>,
        range: std::ops::Range<usize>,
        remote: Option<(RemoteBuffer, u64)>,
    ) -> Result<(), VerbsError> {
        let mut sge = scatter_entry(local, range, &self.device)?;
        // SAFETY: plain data; the fields the opcode needs are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.opcode = match op {
            SendOp::Write => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            SendOp::WriteWithImm(imm) => {
                // The immediate travels big-endian.
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            }
            SendOp::Send => ibv_wr_opcode::IBV_WR_SEND,
            SendOp::SendWithInv(rkey) => {
                wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
                ibv_wr_opcode::IBV_WR_SEND_WITH_INV
            }
        };
        if let Some((buf, offset)) = remote {
            wr.wr.rdma = rdma_t {
                remote_addr: buf.addr + offset,
                rkey: buf.rkey,
            };
        } else {
            assert!(
                matches!(op, SendOp::Send | SendOp::SendWithInv(_)),
                "a write needs a remote buffer"
            );
        }
        // The caller keeps the local bytes valid until the completion.
        self.post(&mut wr, &format!("ibv_post_send({op:?})"))
    }

    /// Posts one send-queue request. `wr` and whatever it points to (its scatter entry) need
    /// only live for the call: the provider copies the request.
    pub(crate) fn post(&self, wr: &mut ibv_send_wr, what: &str) -> Result<(), VerbsError> {
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is live; `wr` is a single valid request (next is null) whose pointers
        // are valid for the call.
        let rc = unsafe { ibv_post_send(self.qp, wr, &mut bad) };
        if rc != 0 {
            return Err(call(what, &self.device, rc));
        }
        Ok(())
    }

    /// Moves the queue pair to the error state: every request still outstanding on it
    /// completes, flushed (`IBV_WC_WR_FLUSH_ERR`), and nothing more is sent or received. How a
    /// request that will not complete in time is cancelled: once its flushed completion is
    /// polled, the NIC is done with its buffer.
    pub fn cancel_all(&self) -> Result<(), VerbsError> {
        // SAFETY: plain data; only the state is set.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify("ERR", &mut a, ibv_qp_attr_mask::IBV_QP_STATE)
    }
}

/// The scatter/gather entry for `local[range]`; a range of 4 GiB or more does not fit one
/// (its length is 32 bits) and is refused rather than truncated.
fn scatter_entry<M: RegisteredMemory>(
    local: &MemoryRegion<M>,
    range: std::ops::Range<usize>,
    device: &str,
) -> Result<ibv_sge, VerbsError> {
    let length = u32::try_from(range.len()).map_err(|_| VerbsError::Call {
        op: format!("a work request of {} bytes", range.len()),
        device: device.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        hint: " (one scatter/gather entry carries less than 4 GiB: send it in parts)",
    })?;
    Ok(ibv_sge {
        addr: local.address_of(&range),
        length,
        lkey: local.lkey(),
    })
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroyed once; its CQs and PD are still alive (held by this struct).
        unsafe { ibv_destroy_qp(self.qp) };
    }
}
