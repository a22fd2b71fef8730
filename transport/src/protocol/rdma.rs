//! What the RDMA transport agrees on over the control connection: queue-pair endpoints, one
//! buffer each way, and where each part lives in it ([`BlockLayout`]).
//!
//! A model of part `k` (server to worker) is two work requests on one RC queue pair, delivered
//! in order: an RDMA WRITE of the 8-byte clock stamp into the stamp table at
//! [`BlockLayout::stamp`], then an RDMA_WRITE_WITH_IMM of the data at [`BlockLayout::data`]
//! whose immediate is [`model_imm`]: `k`, and the key byte of the worker's window over its
//! slot of `k`. The worker's completion for the second therefore finds the stamp in place.
//!
//! A push of part `k` (worker to server) writes only while the slot is the worker's: the server
//! lends it by binding a memory window over that one slot ([`RdmaAccept::windows`] has each
//! window's key, and every model's immediate the byte that changes at each lend), and the push
//! gives it back. The push is an RDMA WRITE of the data through the window, then a
//! SEND_WITH_INV of the 8-byte clock stamp that invalidates the window as it arrives: from then
//! on a write into that slot fails at the server's NIC, and the server reads the gradient with
//! nothing able to change it. Clocks are exact 64-bit values; parts are numbered in 24 bits
//! ([`MAX_PARTS`](super::MAX_PARTS)), and a job over RDMA has at most [`MAX_RDMA_PARTS`].

use std::ops::Range;

use super::{u32_at, u64_at, Parts, ProtocolError};

/// Bytes of a clock stamp.
pub const STAMP_LEN: usize = 8;
const ALIGN: usize = 64;

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Where every part goes in one side's RDMA-writable buffer: a table of stamps, then each tensor
/// contiguous and 64-byte aligned (so a tensor's parts side by side are the tensor). The worker's
/// model buffer and the server's slot block for that worker use the same layout, so one address
/// and rkey each way describe every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLayout {
    /// Byte offset of each tensor's data.
    tensor_at: Vec<usize>,
    /// For each part: its tensor's offset plus its own start, in bytes.
    part_at: Vec<usize>,
    part_len: Vec<usize>,
    len: usize,
}

impl BlockLayout {
    /// The layout for a job's parts.
    pub fn new(parts: &Parts) -> Self {
        let mut off = align_up(parts.len() * STAMP_LEN);
        let mut tensor_at = Vec::with_capacity(parts.dims().len());
        for &d in parts.dims() {
            tensor_at.push(off);
            off += align_up(d * 4);
        }
        let part_at = parts
            .iter()
            .map(|p| tensor_at[p.tensor as usize] + p.start * 4)
            .collect();
        let part_len = parts.iter().map(|p| p.bytes()).collect();
        Self {
            tensor_at,
            part_at,
            part_len,
            len: off.max(ALIGN),
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the layout is empty (never: it is at least one cache line).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Byte range of part `key`'s clock stamp.
    pub fn stamp(&self, key: u32) -> Range<usize> {
        let at = key as usize * STAMP_LEN;
        at..at + STAMP_LEN
    }

    /// Byte range of part `key`'s data.
    pub fn data(&self, key: u32) -> Range<usize> {
        let at = self.part_at[key as usize];
        at..at + self.part_len[key as usize]
    }

    /// Byte range of tensor `t`'s data, of `bytes` bytes.
    pub fn tensor(&self, t: usize, bytes: usize) -> Range<usize> {
        self.tensor_at[t]..self.tensor_at[t] + bytes
    }
}

/// One side's RDMA endpoint and its buffer, laid out as [`BlockLayout`]: the worker offers its
/// model buffer (with the rkey the server writes models through); the server answers with the
/// slot block of that worker (whose rkey is 0: the worker writes only through windows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaParams {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Global identifier.
    pub gid: [u8; 16],
    /// The writable buffer's address in its owner's address space.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its remote key.
    pub rkey: u32,
}

impl RdmaParams {
    /// Payload length of an [`FrameKind::RdmaConnect`](super::FrameKind::RdmaConnect) frame.
    pub const LEN: usize = 4 + 4 + 2 + 16 + 8 + 8 + 4;

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN);
        v.extend_from_slice(&self.qpn.to_le_bytes());
        v.extend_from_slice(&self.psn.to_le_bytes());
        v.extend_from_slice(&self.lid.to_le_bytes());
        v.extend_from_slice(&self.gid);
        v.extend_from_slice(&self.addr.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.rkey.to_le_bytes());
        v
    }

    /// The offer of a worker whose own RDMA setup failed: all zero. The server declines it (the
    /// worker carries on over TCP if it may).
    pub fn unable() -> Self {
        Self {
            qpn: 0,
            psn: 0,
            lid: 0,
            gid: [0; 16],
            addr: 0,
            len: 0,
            rkey: 0,
        }
    }

    /// Whether this is [`RdmaParams::unable`].
    pub fn is_unable(&self) -> bool {
        *self == Self::unable()
    }

    /// Decodes the payload; rejects anything but exactly [`RdmaParams::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        Self::check_len(b, Self::LEN)?;
        Ok(Self::decode_prefix(b))
    }

    fn check_len(b: &[u8], want: usize) -> Result<(), ProtocolError> {
        if b.len() < want {
            return Err(ProtocolError::Truncated {
                what: "RDMA parameters",
                need: want,
                have: b.len(),
            });
        }
        if b.len() > want {
            return Err(ProtocolError::BadHello(format!(
                "{} trailing bytes after the RDMA parameters",
                b.len() - want
            )));
        }
        Ok(())
    }

    /// The parameters at the start of `b` (at least [`RdmaParams::LEN`] bytes).
    fn decode_prefix(b: &[u8]) -> Self {
        Self {
            qpn: u32_at(b, 0),
            psn: u32_at(b, 4),
            lid: u16::from_le_bytes([b[8], b[9]]),
            gid: b[10..26].try_into().expect("16 bytes"),
            addr: u64_at(b, 26),
            len: u64_at(b, 34),
            rkey: u32_at(b, 42),
        }
    }
}

/// The most parts a job may have over RDMA: the server binds a window per part and worker, and
/// its answer carries every window's key. A job with more parts runs over TCP (or with a larger
/// `--partition-kib`).
pub const MAX_RDMA_PARTS: usize = 1 << 14;

/// The server's answer to a worker's RDMA offer: its endpoint and the worker's slot block, and
/// for each part the key of the window over the worker's slot of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaAccept {
    /// The server's endpoint and the worker's slot block.
    pub params: RdmaParams,
    /// Per part, its window's key as of the answer (the low byte changes at every lend: see
    /// [`model_imm`]).
    pub windows: Vec<u32>,
}

impl RdmaAccept {
    /// Payload length for a job of `parts` parts.
    pub fn len(parts: usize) -> usize {
        RdmaParams::LEN + 4 * parts
    }

    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.params.encode();
        for k in &self.windows {
            v.extend_from_slice(&k.to_le_bytes());
        }
        v
    }

    /// Decodes the answer for a job of `parts` parts: exactly that many keys, or an error.
    pub fn decode(b: &[u8], parts: usize) -> Result<Self, ProtocolError> {
        RdmaParams::check_len(b, Self::len(parts))?;
        let windows = (0..parts)
            .map(|i| u32_at(b, RdmaParams::LEN + 4 * i))
            .collect();
        Ok(Self {
            params: RdmaParams::decode_prefix(b),
            windows,
        })
    }
}

/// The immediate of a model write of part `key`: the part in the low 24 bits, and in the high 8
/// the key byte of the worker's window over its slot of that part (lent anew, or still lent).
pub fn model_imm(key: u32, window_rkey: u32) -> u32 {
    debug_assert!((key as usize) < super::MAX_PARTS);
    key | (window_rkey & 0xff) << 24
}

/// The part and the window's key byte in a model write's immediate (see [`model_imm`]).
pub fn split_model_imm(imm: u32) -> (u32, u8) {
    (imm & 0xff_ffff, (imm >> 24) as u8)
}

/// A window's key with its low byte replaced: the key after a lend, from the key of the answer
/// and the byte of a model's immediate.
pub fn with_key_byte(rkey: u32, byte: u8) -> u32 {
    (rkey & !0xff) | u32::from(byte)
}
