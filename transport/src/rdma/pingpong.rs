//! The bare verbs reference the RDMA transport is held against in benchmarks: two RC queue pairs
//! on one device bounce `S` bytes with RDMA_WRITE_WITH_IMM (one write there, one write back),
//! busy-polling the completion queues. No framework, no stamps, no windows: what the device
//! takes to move the bytes both ways.

use std::time::{Duration, Instant};

use hetsync_ffi::{
    Access, Completed, Completion, CompletionQueue, Endpoint, MemoryRegion, QpCaps, QueuePair,
    SendOp, VerbsError,
};
use memmap2::MmapMut;

use super::{random_psn, Local, RdmaConfig};
use crate::LinkError;

/// One side of the ping-pong: a queue pair and its registered buffer. Declared before the
/// region: the queue pair goes first.
struct Side {
    qp: QueuePair,
    recv_cq: CompletionQueue,
    buf: MemoryRegion<MmapMut>,
}

/// Two connected queue pairs bouncing a buffer (see the module's documentation).
pub struct PingPong {
    a: Side,
    b: Side,
    send_cq: CompletionQueue,
    bytes: usize,
    completions: Vec<Completion>,
    _local: Local,
}

impl std::fmt::Debug for PingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PingPong")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// A completion queue of the ping-pong.
#[derive(Clone, Copy)]
enum Queue {
    /// Both sides' sends.
    Sends,
    /// The first side's receives (a write landed in its buffer).
    LandedInA,
    /// The second side's receives.
    LandedInB,
}

/// How long one leg may take before the ping-pong reports the device stuck.
const LEG_LIMIT: Duration = Duration::from_secs(30);

impl PingPong {
    /// Opens the device `cfg` names and connects two queue pairs on it, each with `bytes` of
    /// registered, mmapped memory.
    pub fn new(cfg: &RdmaConfig, bytes: usize) -> Result<Self, LinkError> {
        let local = Local::open(cfg)?;
        let pd = local.ctx.alloc_pd()?;
        let send_cq = local.ctx.create_cq(16, false)?;
        let caps = QpCaps {
            max_send: 8,
            max_recv: 8,
        };
        let side = |recv_cq: CompletionQueue| -> Result<Side, LinkError> {
            let map = MmapMut::map_anon(bytes.max(1)).map_err(|e| {
                LinkError::NoRdma(format!("mapping {bytes} bytes for the ping-pong: {e}"))
            })?;
            let buf = pd.register(map, Access::LOCAL_WRITE | Access::REMOTE_WRITE)?;
            let qp = pd.create_rc_qp(&send_cq, &recv_cq, caps)?;
            Ok(Side { qp, recv_cq, buf })
        };
        let mut a = side(local.ctx.create_cq(8, false)?)?;
        let mut b = side(local.ctx.create_cq(8, false)?)?;
        let end = |s: &Side, psn| Endpoint {
            qpn: s.qp.qpn(),
            psn,
            gid: local.gid,
            lid: local.lid,
        };
        let (pa, pb) = (random_psn(), random_psn() ^ 0x5a5a);
        let (ea, eb) = (end(&a, pa), end(&b, pb));
        a.qp.connect(local.path, pa, &eb)?;
        b.qp.connect(local.path, pb, &ea)?;
        Ok(Self {
            a,
            b,
            send_cq,
            bytes,
            completions: Vec::with_capacity(4),
            _local: local,
        })
    }

    /// One round: `bytes` from the first queue pair into the second's buffer, then back.
    pub fn round(&mut self) -> Result<(), LinkError> {
        self.leg(true)?;
        self.leg(false)?;
        // Both writes have landed, so both have gone: reap their send completions.
        self.wait(Queue::Sends, 2)
    }

    fn leg(&mut self, forth: bool) -> Result<(), LinkError> {
        let (from, to) = if forth {
            (&self.a, &self.b)
        } else {
            (&self.b, &self.a)
        };
        to.qp.post_recv_imm(0)?;
        let remote = to.buf.remote(0..self.bytes.max(1));
        // SAFETY: `from.buf` lives as long as `self`, and nothing writes it while the write is
        // in flight: the round waits for this write to land (and its send completion) before
        // either buffer is used again.
        unsafe {
            from.qp.post_send(
                u64::from(forth),
                SendOp::WriteWithImm(self.bytes as u32),
                &from.buf,
                0..self.bytes.max(1),
                Some((remote, 0)),
            )?;
        }
        self.wait(
            if forth {
                Queue::LandedInB
            } else {
                Queue::LandedInA
            },
            1,
        )
    }

    /// Busy-polls `queue` until `want` completions arrived (all of them successful).
    fn wait(&mut self, queue: Queue, want: usize) -> Result<(), LinkError> {
        let cq = match queue {
            Queue::Sends => &self.send_cq,
            Queue::LandedInA => &self.a.recv_cq,
            Queue::LandedInB => &self.b.recv_cq,
        };
        self.completions.clear();
        let deadline = Instant::now() + LEG_LIMIT;
        while self.completions.len() < want {
            let left = want - self.completions.len();
            cq.poll(&mut self.completions, left)?;
            if Instant::now() > deadline {
                return Err(LinkError::NoRdma(format!(
                    "the ping-pong's writes of {} bytes did not complete within {LEG_LIMIT:?}",
                    self.bytes
                )));
            }
        }
        for c in &self.completions {
            match &c.result {
                Ok(Completed::RdmaWrite | Completed::RecvRdmaWithImm { .. }) => {}
                Ok(other) => {
                    return Err(LinkError::NoRdma(format!(
                        "the ping-pong got an unexpected completion: {other:?}"
                    )))
                }
                Err(e) => return Err(e.clone().into()),
            }
        }
        Ok(())
    }
}

/// Whether an RDMA device can be opened here (for benchmarks that then say why they skip).
pub fn available(cfg: &RdmaConfig) -> Result<(), VerbsError> {
    Local::open(cfg).map(|_| ())
}
