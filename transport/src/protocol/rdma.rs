//! What the RDMA transport agrees on over the control connection: queue-pair endpoints, one
//! writable buffer each way, and where each part lives in it ([`BlockLayout`]).
//!
//! A write of part `k` is two work requests on one RC queue pair, delivered in order: an RDMA
//! WRITE of the 8-byte clock stamp into the stamp table at [`BlockLayout::stamp`], then an
//! RDMA_WRITE_WITH_IMM of the data at [`BlockLayout::data`] whose immediate is `k` itself. The
//! receiver's completion for the second therefore finds the stamp already in place: clocks are
//! exact 64-bit values and a job may have up to [`MAX_PARTS`](super::MAX_PARTS) parts, with any
//! number of workers.

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

/// One side's RDMA endpoint and the buffer (laid out as [`BlockLayout`]) the other side may
/// write: the worker offers its model buffer, the server the slot block of that worker.
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

    /// Decodes the payload; rejects anything but exactly [`RdmaParams::LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        if b.len() < Self::LEN {
            return Err(ProtocolError::Truncated {
                what: "RDMA parameters",
                need: Self::LEN,
                have: b.len(),
            });
        }
        if b.len() > Self::LEN {
            return Err(ProtocolError::BadHello(format!(
                "{} trailing bytes after the RDMA parameters",
                b.len() - Self::LEN
            )));
        }
        Ok(Self {
            qpn: u32_at(b, 0),
            psn: u32_at(b, 4),
            lid: u16::from_le_bytes([b[8], b[9]]),
            gid: b[10..26].try_into().expect("16 bytes"),
            addr: u64_at(b, 26),
            len: u64_at(b, 34),
            rkey: u32_at(b, 42),
        })
    }
}
