//! The arena: every part's model (two versions) and every (worker, part) gradient slot, in one
//! anonymous mmapped region that the server core creates and owns and lends to its transport call
//! by call. RDMA registers it once.
//!
//! Ownership is explicit, because on RDMA a peer writes into its slots without the CPU:
//! - A slot is [`SlotState::Lent`] to its worker (it may write it) or [`SlotState::Held`] by the
//!   server. The transport hands a slot over when a push is complete ([`Arena::hand_over`]); the
//!   server core hands it back once it is done with the gradient, summed or dropped
//!   ([`Arena::lend`]), which is before its reply goes out; the transport lends every slot of a
//!   worker again when its connection ends ([`Arena::reset_worker`]). A gradient can only be read
//!   while held ([`Arena::gradient`]), and TCP can only receive into a lent slot
//!   ([`Arena::receive_into`]): no `&[f32]` exists over memory a peer is entitled to write.
//! - Each part has two model versions. Sends read a version and count as its readers
//!   ([`Arena::start_send`], [`Arena::end_send`]). An update rewrites the current version in
//!   place when nothing reads it (the common case, and the cheapest: no second buffer to pull
//!   into cache), and otherwise writes the other version, which then becomes current: an update
//!   never touches memory a send is reading. Only if both versions have readers (a peer that left
//!   a whole round's model unread) does [`Arena::update`] refuse, and the transport must first
//!   release the older one.
//!
//! Layout: two version blocks, then one block per worker, each a [`BlockLayout`] (a stamp table,
//! then each tensor contiguous and 64-byte aligned), so a worker's slots are one range that can be
//! registered for that worker alone. Worker blocks are staggered off multiples of 4 KiB so that K
//! slots summed in one pass do not all alias the same cache sets (measured on this machine kind:
//! 27 -> 34 GB/s at K = 8).

// Slices over the map are made from its base pointer so that each borrow covers exactly the
// memory the ownership rules above allow; every unsafe block says which rule holds.
#![allow(unsafe_code)]

use std::io;
use std::ops::Range;
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};

use crate::protocol::rdma::BlockLayout;
use crate::protocol::Parts;
use crate::{Clock, Key, Rank};

const PAGE: usize = 4096;
/// Added to a block stride that would otherwise be a multiple of 4 KiB (a multiple of 64).
const STAGGER: usize = 320;

/// Who may touch a gradient slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The worker may write it (its next push goes here).
    Lent,
    /// The server holds a complete gradient computed on the model of round `clock`.
    Held {
        /// The round of the model the gradient was computed on.
        clock: Clock,
    },
}

/// One of a part's two model versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version(pub u8);

impl Version {
    fn other(self) -> Version {
        Version(1 - self.0)
    }
}

/// Where an update writes, handed to the closure of [`Arena::update`].
#[derive(Debug)]
pub enum Update<'a> {
    /// Nothing reads the current model: rewrite it in place.
    InPlace(&'a mut [f32]),
    /// The current model is being sent: write the next one from it.
    Into {
        /// The version that becomes current.
        next: &'a mut [f32],
        /// The current model.
        model: &'a [f32],
    },
}

/// Why a slot changed hands or an update was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArenaError {
    /// A push landed in a slot the server still holds: the worker pushed the part again before
    /// it was sent the reply to the previous push.
    #[error(
        "worker {rank} pushed part {key} again before receiving the reply to its previous push"
    )]
    SlotHeld {
        /// The worker.
        rank: Rank,
        /// The part.
        key: Key,
    },
    /// The version an update would write is still being sent: release it first.
    #[error("version {version:?} of part {key} is still being sent")]
    VersionBusy {
        /// The part.
        key: Key,
        /// The busy version.
        version: Version,
    },
}

/// Keeps an arena's memory mapped for as long as it lives, even past the arena: what a NIC
/// registration of that memory holds (see [`Arena::pin`]).
#[derive(Debug, Clone)]
pub struct ArenaPin(#[allow(dead_code)] Arc<MmapMut>);

/// The arena. See the [module documentation](self).
#[derive(Debug)]
pub struct Arena {
    /// Keeps the memory mapped; only reached through `base`.
    map: Arc<MmapMut>,
    base: *mut u8,
    len: usize,
    parts: Parts,
    workers: usize,
    block: BlockLayout,
    /// Start of worker 0's block; worker w adds `w * stride`.
    blocks_at: usize,
    stride: usize,
    slots: Vec<SlotState>,
    current: Vec<Version>,
    rounds: Vec<[Clock; 2]>,
    readers: Vec<[u32; 2]>,
}

// SAFETY: the arena owns its mapping; the raw base pointer is only dereferenced through `&self`
// and `&mut self` methods that follow Rust's borrow rules for the ranges they hand out.
unsafe impl Send for Arena {}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

impl Arena {
    /// Maps and pre-faults a zeroed arena for `workers` workers and `parts`, advising
    /// transparent huge pages. Every slot starts lent, every model at round 0.
    pub fn new(workers: usize, parts: Parts) -> Result<Self, io::Error> {
        let block = BlockLayout::new(&parts);
        let overflow = || io::Error::new(io::ErrorKind::InvalidInput, "arena size overflows");
        let vblock = align64(block.len());
        let blocks_at = (2 * vblock).div_ceil(PAGE) * PAGE;
        let mut stride = align64(block.len());
        if stride.is_multiple_of(PAGE) {
            stride += STAGGER;
        }
        let len = stride
            .checked_mul(workers)
            .and_then(|s| s.checked_add(blocks_at))
            .ok_or_else(overflow)?
            .div_ceil(PAGE)
            * PAGE;
        let mut map = MmapOptions::new()
            .len(len)
            .populate()
            .map_anon()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("mmap of the {} MiB arena failed: {e}", len >> 20),
                )
            })?;
        // Best effort: THP is in madvise mode on these machines; failure only costs TLB misses.
        let _ = map.advise(memmap2::Advice::HugePage);
        let n = parts.len();
        Ok(Self {
            base: map.as_mut_ptr(),
            map: Arc::new(map),
            len,
            workers,
            block,
            blocks_at,
            stride,
            slots: vec![SlotState::Lent; workers * n],
            current: vec![Version(0); n],
            rounds: vec![[0; 2]; n],
            readers: vec![[0; 2]; n],
            parts,
        })
    }

    /// The job's parts.
    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    /// Workers (slots per part).
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Total bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the arena is empty (never: it holds at least one page).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the mapping, for registering it with a NIC. The mapping never moves; it stays
    /// mapped while the arena or a [`pin`](Self::pin) of it lives; memory is only read and
    /// written through the arena's methods.
    pub fn base_ptr(&mut self) -> *mut u8 {
        self.base
    }

    /// A handle that keeps the memory mapped even if the arena is dropped first: a registration
    /// of the arena with a NIC holds one, so the NIC can never write unmapped memory.
    pub fn pin(&self) -> ArenaPin {
        ArenaPin(self.map.clone())
    }

    /// Whether this is the arena `pin` was taken from.
    pub fn is_pinned_by(&self, pin: &ArenaPin) -> bool {
        Arc::ptr_eq(&self.map, &pin.0)
    }

    /// How each block (a version, or one worker's slots) is laid out.
    pub fn block_layout(&self) -> &BlockLayout {
        &self.block
    }

    /// Byte range (within the arena) of worker `rank`'s block of slots: what its RDMA peer may
    /// write.
    pub fn worker_block(&self, rank: Rank) -> Range<usize> {
        assert!((rank as usize) < self.workers, "worker {rank} out of range");
        let at = self.blocks_at + rank as usize * self.stride;
        at..at + self.block.len()
    }

    fn version_block(&self, v: Version) -> usize {
        v.0 as usize * align64(self.block.len())
    }

    /// Byte range (within the arena) of version `v` of part `key`'s round stamp.
    pub fn version_stamp(&self, key: Key, v: Version) -> Range<usize> {
        shift(self.block.stamp(key), self.version_block(v))
    }

    /// Byte range (within the arena) of version `v` of part `key`'s data.
    pub fn version_data(&self, key: Key, v: Version) -> Range<usize> {
        shift(self.block.data(key), self.version_block(v))
    }

    fn slot_index(&self, rank: Rank, key: Key) -> usize {
        assert!((rank as usize) < self.workers, "worker {rank} out of range");
        rank as usize * self.parts.len() + key as usize
    }

    fn slot_data(&self, rank: Rank, key: Key) -> Range<usize> {
        shift(self.block.data(key), self.worker_block(rank).start)
    }

    /// The bytes at `r`.
    ///
    /// # Safety
    /// No `&mut` to any byte of `r` may exist for the returned lifetime, and no peer may be
    /// entitled to write `r` (a model version, or a held slot).
    unsafe fn bytes(&self, r: Range<usize>) -> &[u8] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "{r:?} outside the arena"
        );
        // SAFETY: in bounds (checked); the map lives as long as `self`; the caller rules out
        // writers.
        unsafe { std::slice::from_raw_parts(self.base.add(r.start), r.len()) }
    }

    /// The bytes at `r`, mutable.
    ///
    /// # Safety
    /// No other reference to any byte of `r` may exist for the returned lifetime.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self, r: Range<usize>) -> &mut [u8] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "{r:?} outside the arena"
        );
        // SAFETY: in bounds (checked); the map lives as long as `self`; the caller rules out
        // other references.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(r.start), r.len()) }
    }

    // ---- models ----

    /// The current version of part `key`.
    pub fn current(&self, key: Key) -> Version {
        self.current[key as usize]
    }

    /// Rounds closed on part `key`: the round of its current model.
    pub fn round(&self, key: Key) -> Clock {
        let v = self.current(key);
        self.rounds[key as usize][v.0 as usize]
    }

    /// The round version `v` of part `key` holds.
    pub fn version_round(&self, key: Key, v: Version) -> Clock {
        self.rounds[key as usize][v.0 as usize]
    }

    /// Part `key`'s current model.
    pub fn model(&self, key: Key) -> &[f32] {
        bytemuck::cast_slice(self.version_bytes(key, self.current(key)))
    }

    /// Version `v` of part `key`, as bytes to send.
    pub fn version_bytes(&self, key: Key, v: Version) -> &[u8] {
        // SAFETY: model versions are never remotely writable and only written by `update`,
        // which takes `&mut self`.
        unsafe { self.bytes(self.version_data(key, v)) }
    }

    /// Every tensor's current model, in key order, as raw little-endian f32.
    pub fn write_models(&self, out: &mut impl io::Write) -> io::Result<()> {
        for key in 0..self.parts.len() as Key {
            out.write_all(bytemuck::cast_slice(self.model(key)))?;
        }
        Ok(())
    }

    /// A send of part `key`'s current version starts: it may not change until
    /// [`end_send`](Self::end_send). Returns the version and its round.
    pub fn start_send(&mut self, key: Key) -> (Version, Clock) {
        let v = self.current(key);
        self.readers[key as usize][v.0 as usize] += 1;
        (v, self.version_round(key, v))
    }

    /// A send of version `v` of part `key` is over (complete, or abandoned).
    pub fn end_send(&mut self, key: Key, v: Version) {
        let r = &mut self.readers[key as usize][v.0 as usize];
        *r = r.checked_sub(1).expect("end_send without start_send");
    }

    /// Sends still reading version `v` of part `key`.
    pub fn readers(&self, key: Key, v: Version) -> u32 {
        self.readers[key as usize][v.0 as usize]
    }

    /// Closes a round of part `key`: calls `f(target, gradients)` with where the new model goes
    /// ([`Update`]) and the held gradients of `participants`; the new model is then current at
    /// the following round, which is returned.
    ///
    /// Fails, changing nothing, when both versions are being sent ([`ArenaError::VersionBusy`]
    /// names the one to release).
    ///
    /// # Panics
    /// If a participant's slot is not held: the caller may only sum gradients it was handed.
    pub fn update(
        &mut self,
        key: Key,
        participants: &[Rank],
        f: impl FnOnce(Update<'_>, &[&[f32]]),
    ) -> Result<Clock, ArenaError> {
        let cur = self.current(key);
        let next = if self.readers(key, cur) == 0 {
            cur
        } else {
            cur.other()
        };
        if self.readers(key, next) > 0 {
            return Err(ArenaError::VersionBusy { key, version: next });
        }
        let grads: Vec<&[f32]> = participants
            .iter()
            .map(|&r| {
                self.gradient(r, key)
                    .unwrap_or_else(|| panic!("worker {r}'s slot of part {key} is not held"))
            })
            .collect();
        // SAFETY: `next` has no readers (checked) and is not remotely writable; it is disjoint
        // from every slot (and from `cur` when it is not `cur`); `&mut self` excludes every other
        // borrow of it.
        let dst = bytemuck::cast_slice_mut(unsafe { self.bytes_mut(self.version_data(key, next)) });
        if next == cur {
            f(Update::InPlace(dst), &grads);
        } else {
            let model = bytemuck::cast_slice(self.version_bytes(key, cur));
            f(Update::Into { next: dst, model }, &grads);
        }
        let round = self.round(key) + 1;
        self.rounds[key as usize][next.0 as usize] = round;
        // SAFETY: as above: the stamp belongs to `next`, which nobody reads.
        let stamp = unsafe { self.bytes_mut(self.version_stamp(key, next)) };
        stamp.copy_from_slice(&round.to_le_bytes());
        self.current[key as usize] = next;
        Ok(round)
    }

    /// Puts a saved model back: part `key`'s current version becomes `model` at round `round`
    /// (resuming from a checkpoint, before any send).
    ///
    /// # Panics
    /// If a send is reading the part, or `model` is not the part's size.
    pub fn restore(&mut self, key: Key, model: &[f32], round: Clock) {
        let cur = self.current(key);
        assert_eq!(
            self.readers(key, cur),
            0,
            "restoring part {key} while it is sent"
        );
        // SAFETY: the current version has no readers (checked), is never remotely writable, and
        // `&mut self` excludes every other borrow of it.
        let dst: &mut [f32] =
            bytemuck::cast_slice_mut(unsafe { self.bytes_mut(self.version_data(key, cur)) });
        dst.copy_from_slice(model);
        self.rounds[key as usize][cur.0 as usize] = round;
        // SAFETY: as above, the stamp belongs to that version.
        let stamp = unsafe { self.bytes_mut(self.version_stamp(key, cur)) };
        stamp.copy_from_slice(&round.to_le_bytes());
    }

    // ---- slots ----

    /// Who holds worker `rank`'s slot of part `key`.
    pub fn slot_state(&self, rank: Rank, key: Key) -> SlotState {
        self.slots[self.slot_index(rank, key)]
    }

    /// Worker `rank`'s slot of part `key` as bytes to receive a push into, while it is lent to
    /// the worker; `None` while the server holds it.
    pub fn receive_into(&mut self, rank: Rank, key: Key) -> Option<&mut [u8]> {
        if self.slot_state(rank, key) != SlotState::Lent {
            return None;
        }
        // SAFETY: a lent slot is never read by the server, and `&mut self` excludes every other
        // borrow; on TCP the transport is the worker's only way to write it.
        Some(unsafe { self.bytes_mut(self.slot_data(rank, key)) })
    }

    /// Worker `rank`'s push of part `key`, computed on the model of round `clock`, is complete
    /// in its slot: the server holds it from now on.
    pub fn hand_over(&mut self, rank: Rank, key: Key, clock: Clock) -> Result<(), ArenaError> {
        let i = self.slot_index(rank, key);
        if self.slots[i] != SlotState::Lent {
            return Err(ArenaError::SlotHeld { rank, key });
        }
        self.slots[i] = SlotState::Held { clock };
        Ok(())
    }

    /// Worker `rank`'s gradient of part `key`, while the server holds it.
    pub fn gradient(&self, rank: Rank, key: Key) -> Option<&[f32]> {
        if !matches!(self.slot_state(rank, key), SlotState::Held { .. }) {
            return None;
        }
        // SAFETY: a held slot is the server's: nothing can write it. On TCP only `receive_into`,
        // which needs `&mut self`, writes slots. On RDMA a worker writes a slot only through the
        // window the server bound over it when lending it, and the transport hands a push over
        // only once the push's send has invalidated that window: a later write fails at the NIC.
        Some(bytemuck::cast_slice(unsafe {
            self.bytes(self.slot_data(rank, key))
        }))
    }

    /// Hands worker `rank`'s slot of part `key` back to it: the server is done with the gradient
    /// (summed or dropped), and the reply that lets the worker push again follows.
    pub fn lend(&mut self, rank: Rank, key: Key) {
        let i = self.slot_index(rank, key);
        self.slots[i] = SlotState::Lent;
    }

    /// Worker `rank`'s connection is gone: every slot of it is lent again, for whoever takes its
    /// rank next (the transport calls this before it admits anyone for that rank).
    pub fn reset_worker(&mut self, rank: Rank) {
        let n = self.parts.len();
        let at = rank as usize * n;
        self.slots[at..at + n].fill(SlotState::Lent);
    }
}

fn shift(r: Range<usize>, by: usize) -> Range<usize> {
    r.start + by..r.end + by
}

#[cfg(test)]
mod tests;
