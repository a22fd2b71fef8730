//! The handshake: the worker's [`Hello`] (who it is, the job it expects) and the server's
//! [`Welcome`] (the partition size every tensor travels in).

use super::{u32_at, u64_at, ProtocolError};
use crate::protocol::parts::{MAX_PART_BYTES, MIN_PART_BYTES};

/// Most tensors a job may declare.
pub const MAX_TENSORS: usize = 65_536;
/// Bytes of an authentication nonce (in a hello and a challenge).
pub const NONCE_LEN: usize = 32;
/// Bytes of an authentication proof (an HMAC-SHA256 tag, in a challenge and an auth frame).
pub const PROOF_LEN: usize = 32;
/// Payload length of a challenge: the server's nonce and its proof.
pub const CHALLENGE_LEN: usize = NONCE_LEN + PROOF_LEN;

/// The handshake a worker opens with: who it is and the job it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The worker's rank, `0..workers`.
    pub rank: u32,
    /// How many workers the worker believes the job has; 0 when it does not know (the server
    /// then checks the rank against its own job size).
    pub workers: u32,
    /// Elements (f32) of each tensor, in key order.
    pub dims: Vec<u64>,
    /// An [`FrameKind::RdmaConnect`](super::FrameKind::RdmaConnect) offer follows the welcome:
    /// the server reports the worker as joined only once it has answered it, so no model goes out
    /// before the transport is settled.
    pub rdma: bool,
    /// The worker's nonce when it authenticates with a shared secret (the server answers with a
    /// [`FrameKind::Challenge`](super::FrameKind::Challenge)); `None` when it does not.
    pub auth_nonce: Option<[u8; NONCE_LEN]>,
}

/// Hello flag bit: an RDMA offer follows.
const HELLO_RDMA: u32 = 1;
/// Hello flag bit: the worker authenticates; its nonce follows the flags.
const HELLO_AUTH: u32 = 2;

impl Hello {
    /// The largest hello payload: one with [`MAX_TENSORS`] tensors and a nonce.
    pub const MAX_LEN: usize = 16 + 8 * MAX_TENSORS + NONCE_LEN;

    /// Encodes the hello payload (without the header).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + 8 * self.dims.len());
        v.extend_from_slice(&self.rank.to_le_bytes());
        v.extend_from_slice(&self.workers.to_le_bytes());
        v.extend_from_slice(&(self.dims.len() as u32).to_le_bytes());
        for d in &self.dims {
            v.extend_from_slice(&d.to_le_bytes());
        }
        let mut flags = if self.rdma { HELLO_RDMA } else { 0 };
        if self.auth_nonce.is_some() {
            flags |= HELLO_AUTH;
        }
        v.extend_from_slice(&flags.to_le_bytes());
        if let Some(n) = &self.auth_nonce {
            v.extend_from_slice(n);
        }
        v
    }

    /// Decodes a hello payload; rejects truncation, trailing bytes, no tensors, too many tensors,
    /// zero-sized tensors and a rank outside the declared job (when one is declared).
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        let truncated = |need| ProtocolError::Truncated {
            what: "hello payload",
            need,
            have: b.len(),
        };
        if b.len() < 12 {
            return Err(truncated(12));
        }
        let (rank, workers, n) = (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8) as usize);
        if n == 0 || n > MAX_TENSORS {
            return Err(ProtocolError::BadHello(format!(
                "{n} tensors declared (must be 1..={MAX_TENSORS})"
            )));
        }
        let at_flags = 12 + 8 * n;
        if b.len() < at_flags + 4 {
            return Err(truncated(at_flags + 4));
        }
        let flags = u32_at(b, at_flags);
        if flags & !(HELLO_RDMA | HELLO_AUTH) != 0 {
            return Err(ProtocolError::BadHello(format!(
                "unknown hello flags {flags:#x}"
            )));
        }
        let need = at_flags
            + 4
            + if flags & HELLO_AUTH != 0 {
                NONCE_LEN
            } else {
                0
            };
        if b.len() < need {
            return Err(truncated(need));
        }
        if b.len() > need {
            return Err(ProtocolError::BadHello(format!(
                "{} trailing bytes after {n} tensor sizes, the flags and the nonce",
                b.len() - need
            )));
        }
        let dims: Vec<u64> = (0..n).map(|k| u64_at(b, 12 + 8 * k)).collect();
        if let Some(k) = dims.iter().position(|&d| d == 0) {
            return Err(ProtocolError::BadHello(format!("tensor {k} has size 0")));
        }
        if workers != 0 && rank >= workers {
            return Err(ProtocolError::BadHello(format!(
                "rank {rank} is not in 0..{workers}"
            )));
        }
        Ok(Self {
            rank,
            workers,
            dims,
            rdma: flags & HELLO_RDMA != 0,
            auth_nonce: (flags & HELLO_AUTH != 0)
                .then(|| b[at_flags + 4..need].try_into().expect("NONCE_LEN bytes")),
        })
    }
}

/// What the clock a worker stamps on a push means: the server's synchronisation policy decides,
/// and says so in its [`Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushClock {
    /// The round of the part's model the gradient was computed on, as the last model received
    /// said (barrier policies: `naive`, `timeout`, `adaptive`).
    #[default]
    ModelRound,
    /// The worker's own clock, which it ticks once per iteration (vector-clock policies: BSP,
    /// SSP, ASP). A push at clock `c` completes the worker's iteration `c` on that part, and the
    /// model it gets back is its read at clock `c + 1`.
    WorkerClock,
}

/// Welcome flag bit: pushes carry the worker's clock ([`PushClock::WorkerClock`]).
const WELCOME_WORKER_CLOCK: u32 = 1;

/// The server's acceptance of a hello: how tensors are cut into parts on this job, and what a
/// push's clock means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// Largest part in bytes: a tensor larger than this travels and synchronises in parts.
    pub part_bytes: u64,
    /// What the clock of a push means.
    pub push_clock: PushClock,
}

impl Welcome {
    /// Payload length of a welcome: the partition size and the flags.
    pub const LEN: usize = 12;

    /// Encodes the welcome payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.part_bytes.to_le_bytes());
        let flags = match self.push_clock {
            PushClock::ModelRound => 0,
            PushClock::WorkerClock => WELCOME_WORKER_CLOCK,
        };
        b[8..].copy_from_slice(&flags.to_le_bytes());
        b
    }

    /// Decodes a welcome payload; rejects a partition size the protocol does not allow and
    /// unknown flags.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        if b.len() != Self::LEN {
            return Err(ProtocolError::Truncated {
                what: "welcome payload",
                need: Self::LEN,
                have: b.len(),
            });
        }
        let part_bytes = u64_at(b, 0);
        if !(MIN_PART_BYTES as u64..=MAX_PART_BYTES as u64).contains(&part_bytes)
            || !part_bytes.is_multiple_of(MIN_PART_BYTES as u64)
        {
            return Err(ProtocolError::BadHello(format!(
                "partition size {part_bytes} bytes is not a multiple of {MIN_PART_BYTES} up to {MAX_PART_BYTES}"
            )));
        }
        let push_clock = match u32_at(b, 8) {
            0 => PushClock::ModelRound,
            WELCOME_WORKER_CLOCK => PushClock::WorkerClock,
            flags => {
                return Err(ProtocolError::BadHello(format!(
                    "unknown welcome flags {flags:#x}"
                )))
            }
        };
        Ok(Self {
            part_bytes,
            push_clock,
        })
    }
}
