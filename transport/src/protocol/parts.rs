//! How a job's tensors are cut into parts: the unit that travels, is summed and is synchronised.
//!
//! Tensor `t` of `d` floats becomes `ceil(4 d / P)` parts of at most `P` bytes (the partition size
//! the server announces in its welcome), numbered across tensors in order: key `k` of a push or
//! model frame is a part index. A part is a contiguous run of its tensor, so a tensor's parts
//! put side by side are the tensor, and partitioning changes no result.

use std::ops::Range;

use super::ProtocolError;

/// Most parts a job may have (the RDMA immediate carries a part index in 32 bits; this bound
/// keeps per-part tables small enough to allocate up front).
pub const MAX_PARTS: usize = 1 << 24;
/// Smallest partition size, and the granule of every partition size: keeps parts 64-byte
/// aligned within their tensor.
pub const MIN_PART_BYTES: usize = 1024;
/// Largest partition size: below 4 GiB, so one part is always one RDMA scatter/gather entry.
pub const MAX_PART_BYTES: usize = 1 << 30;

/// One part: a contiguous run of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// The tensor it belongs to.
    pub tensor: u32,
    /// Its index among its tensor's parts.
    pub index: u32,
    /// First element (f32) within the tensor.
    pub start: usize,
    /// Elements (f32).
    pub len: usize,
}

impl Part {
    /// Bytes on the wire.
    pub fn bytes(&self) -> usize {
        self.len * 4
    }

    /// Its elements within the tensor.
    pub fn elems(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Every part of a job, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    dims: Vec<usize>,
    part_bytes: usize,
    parts: Vec<Part>,
    /// Key of each tensor's first part; one more entry: the number of parts.
    first: Vec<u32>,
}

impl Parts {
    /// Cuts tensors of `dims` floats into parts of at most `part_bytes` bytes.
    ///
    /// Fails when `part_bytes` is not a multiple of [`MIN_PART_BYTES`] up to [`MAX_PART_BYTES`],
    /// a tensor is empty, or the job would have more than [`MAX_PARTS`] parts.
    pub fn new(dims: &[usize], part_bytes: usize) -> Result<Self, ProtocolError> {
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&part_bytes)
            || !part_bytes.is_multiple_of(MIN_PART_BYTES)
        {
            return Err(ProtocolError::BadHello(format!(
                "partition size {part_bytes} bytes is not a multiple of {MIN_PART_BYTES} up to {MAX_PART_BYTES}"
            )));
        }
        let per = part_bytes / 4;
        let mut total = 0usize;
        for (t, &d) in dims.iter().enumerate() {
            if d == 0 {
                return Err(ProtocolError::BadHello(format!("tensor {t} has size 0")));
            }
            total = total.saturating_add(d.div_ceil(per));
        }
        if total > MAX_PARTS {
            return Err(ProtocolError::BadHello(format!(
                "{total} parts of {part_bytes} bytes, more than the {MAX_PARTS} a job may have (use a larger partition size)"
            )));
        }
        let mut parts = Vec::with_capacity(total);
        let mut first = Vec::with_capacity(dims.len() + 1);
        for (t, &d) in dims.iter().enumerate() {
            first.push(parts.len() as u32);
            for (index, start) in (0..d).step_by(per).enumerate() {
                parts.push(Part {
                    tensor: t as u32,
                    index: index as u32,
                    start,
                    len: per.min(d - start),
                });
            }
        }
        first.push(parts.len() as u32);
        Ok(Self {
            dims: dims.to_vec(),
            part_bytes,
            parts,
            first,
        })
    }

    /// Elements of each tensor.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The partition size in bytes.
    pub fn part_bytes(&self) -> usize {
        self.part_bytes
    }

    /// Number of parts (keys on the wire).
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether the job has no parts (never true for a valid job).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Part `key`, or [`ProtocolError::BadKey`].
    pub fn get(&self, key: u32) -> Result<&Part, ProtocolError> {
        self.parts.get(key as usize).ok_or(ProtocolError::BadKey {
            key,
            keys: self.parts.len(),
        })
    }

    /// Every part, in key order.
    pub fn iter(&self) -> std::slice::Iter<'_, Part> {
        self.parts.iter()
    }

    /// The keys of tensor `t`'s parts.
    pub fn of_tensor(&self, t: usize) -> Range<u32> {
        self.first[t]..self.first[t + 1]
    }
}

impl std::ops::Index<u32> for Parts {
    type Output = Part;

    fn index(&self, key: u32) -> &Part {
        &self.parts[key as usize]
    }
}
