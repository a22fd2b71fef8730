//! Protection domains and memory regions.
//!
//! A [`MemoryRegion`] owns the memory it registers, so the memory cannot be freed, moved or
//! reallocated while the NIC may touch it: deregistration runs in the region's Drop, before the
//! memory itself is dropped.

use std::fmt;
use std::ops::BitOr;
use std::sync::Arc;

use rdma_sys::*;

use crate::device::{Context, ContextInner};
use crate::error::{call, last_errno, VerbsError};

pub(crate) struct PdInner {
    pub(crate) pd: *mut ibv_pd,
    pub(crate) ctx: Arc<ContextInner>,
}

// SAFETY: verbs objects may be used from any thread; the pointer is only freed in Drop.
unsafe impl Send for PdInner {}
// SAFETY: as above.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc to it, so none is left.
        unsafe { ibv_dealloc_pd(self.pd) };
    }
}

/// A protection domain: memory regions and queue pairs live in one.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(crate) inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name)
            .finish()
    }
}

impl Context {
    /// Allocates a protection domain.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain, VerbsError> {
        // SAFETY: the context is open.
        let pd = unsafe { ibv_alloc_pd(self.inner.ctx) };
        if pd.is_null() {
            return Err(call("ibv_alloc_pd", self.name(), last_errno()));
        }
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: self.inner.clone(),
            }),
        })
    }
}

/// What a memory region allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u32);

impl Access {
    /// The local NIC may write (needed for receives and for remote write access).
    pub const LOCAL_WRITE: Access = Access(ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// Peers may RDMA-write into the region.
    pub const REMOTE_WRITE: Access = Access(ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// Peers may RDMA-read from the region.
    pub const REMOTE_READ: Access = Access(ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    /// Memory windows may be bound over the region ([`MemoryWindow`](crate::MemoryWindow)).
    pub const MW_BIND: Access = Access(ibv_access_flags::IBV_ACCESS_MW_BIND.0);

    /// The `ibv_access_flags` bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// Memory that can be registered: its bytes keep their address for as long as the value lives,
/// even when the value itself is moved (heap buffers and maps, not arrays on the stack).
///
/// # Safety
/// `as_bytes` and `as_bytes_mut` must always return the same address and length for one value,
/// and the memory must stay allocated until the value is dropped.
pub unsafe trait RegisteredMemory {
    /// The bytes.
    fn as_bytes(&self) -> &[u8];
    /// The bytes, mutable.
    fn as_bytes_mut(&mut self) -> &mut [u8];
    /// Start address and length, without creating a slice.
    fn addr_len(&self) -> (usize, usize) {
        let b = self.as_bytes();
        (b.as_ptr() as usize, b.len())
    }
}

/// Memory owned elsewhere (e.g. the server's arena), registered in place. Only its
/// address is used: its bytes are read and written through the owner, never through the region.
#[derive(Debug)]
pub struct ExternalMemory {
    ptr: *mut u8,
    len: usize,
}

impl ExternalMemory {
    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The memory must stay allocated, at this address, until the [`MemoryRegion`] registering
    /// it has been dropped (declare the region before the owner in a struct, so it drops first).
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        Self { ptr, len }
    }
}

// SAFETY: it is only an address; the owner guarantees the memory (see `new`).
unsafe impl Send for ExternalMemory {}
// SAFETY: as above; nothing is read through it.
unsafe impl Sync for ExternalMemory {}

// SAFETY: `new`'s contract keeps the address valid and fixed. The slice methods are never used
// by this crate for ExternalMemory (it overrides `addr_len`); they panic to keep the owner's
// references the only ones.
unsafe impl RegisteredMemory for ExternalMemory {
    fn as_bytes(&self) -> &[u8] {
        panic!("ExternalMemory is accessed through its owner, not through the region")
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        panic!("ExternalMemory is accessed through its owner, not through the region")
    }
    fn addr_len(&self) -> (usize, usize) {
        (self.ptr as usize, self.len)
    }
}

// SAFETY: a Vec's heap buffer does not move when the Vec does, and nothing can resize it while
// the region owns it (the region hands out slices, never the Vec).
unsafe impl RegisteredMemory for Vec<u8> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

// SAFETY: a boxed slice never moves or resizes.
unsafe impl RegisteredMemory for Box<[u8]> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

// SAFETY: a map stays at its address until it is unmapped in Drop.
unsafe impl RegisteredMemory for memmap2::MmapMut {
    fn as_bytes(&self) -> &[u8] {
        self
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// Where a peer may write: what a side sends the other out of band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    /// The buffer's address in the owner's address space.
    pub addr: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The key that authorises access.
    pub rkey: u32,
}

/// A registered memory region that owns its memory.
pub struct MemoryRegion<M: RegisteredMemory> {
    mr: *mut ibv_mr,
    _pd: Arc<PdInner>,
    mem: M,
}

// SAFETY: the MR pointer is only used for its keys and freed in Drop; M itself is Send.
unsafe impl<M: RegisteredMemory + Send> Send for MemoryRegion<M> {}
// SAFETY: shared access only reads the keys and hands out shared slices.
unsafe impl<M: RegisteredMemory + Sync> Sync for MemoryRegion<M> {}

impl<M: RegisteredMemory> fmt::Debug for MemoryRegion<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("len", &self.mem.as_bytes().len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl ProtectionDomain {
    /// Registers `mem` with the rights `access`. The region owns the memory from now on.
    pub fn register<M: RegisteredMemory>(
        &self,
        mem: M,
        access: Access,
    ) -> Result<MemoryRegion<M>, VerbsError> {
        let (addr, len) = mem.addr_len();
        // SAFETY: addr..addr+len is valid memory owned by `mem` (or guaranteed by its owner, for
        // ExternalMemory), kept alive at the same address until after ibv_dereg_mr.
        let mr = unsafe { ibv_reg_mr(self.inner.pd, addr as *mut _, len, access.0 as i32) };
        if mr.is_null() {
            let op = format!("ibv_reg_mr of {}", human(len));
            return Err(call(op, &self.inner.ctx.name, last_errno()));
        }
        Ok(MemoryRegion {
            mr,
            _pd: self.inner.clone(),
            mem,
        })
    }
}

impl<M: RegisteredMemory> MemoryRegion<M> {
    /// The key local work requests use.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `mr` is a live registration until Drop.
        unsafe { (*self.mr).lkey }
    }

    /// The raw registration, for binding windows over it.
    pub(crate) fn raw(&self) -> *mut ibv_mr {
        self.mr
    }

    /// The key peers use to access the region.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr).rkey }
    }

    /// The registered bytes.
    ///
    /// With remote write access granted, a peer may write into the region at any time; callers
    /// read only the parts their protocol says the peer is done with.
    pub fn bytes(&self) -> &[u8] {
        self.mem.as_bytes()
    }

    /// The registered bytes, mutable (see [`bytes`](Self::bytes)).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.mem.as_bytes_mut()
    }

    /// The owned memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The owned memory, mutable. The address must not change (guaranteed by
    /// [`RegisteredMemory`] for the types it is implemented for).
    pub fn memory_mut(&mut self) -> &mut M {
        &mut self.mem
    }

    /// Start address and length of the registered memory.
    pub fn addr_len(&self) -> (usize, usize) {
        self.mem.addr_len()
    }

    /// The address where `range` of this region starts.
    ///
    /// # Panics
    /// If `range` reaches past the region.
    pub fn address_of(&self, range: &std::ops::Range<usize>) -> u64 {
        let (addr, len) = self.addr_len();
        assert!(
            range.end <= len,
            "range {range:?} outside the region of {len} bytes"
        );
        addr as u64 + range.start as u64
    }

    /// What a peer needs to write into `range` of this region.
    pub fn remote(&self, range: std::ops::Range<usize>) -> RemoteBuffer {
        RemoteBuffer {
            addr: self.address_of(&range),
            len: range.len() as u64,
            rkey: self.rkey(),
        }
    }
}

impl<M: RegisteredMemory> Drop for MemoryRegion<M> {
    fn drop(&mut self) {
        // SAFETY: deregistered exactly once, here, before `mem` (a field) is dropped.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}
