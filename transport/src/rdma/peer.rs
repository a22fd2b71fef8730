//! An RDMA-connected worker as the server sees it: its queue pair, the memory windows that lend
//! it its slots one part at a time, the receives that take its pushes' stamps, and its model
//! writes in flight.

use std::collections::{HashMap, VecDeque};

use hetsync_ffi::{
    Access, ExternalMemory, MemoryRegion, MemoryWindow, QueuePair, RemoteBuffer, VerbsError,
};

use super::BIND_WR;
use crate::protocol::rdma::STAMP_LEN;
use crate::{Key, Rank, Version};

/// One RDMA-connected worker. Teardown (field) order: the windows (a bound one holds its queue
/// pair: rxe stalls 50 s destroying a queue pair that still has them), the queue pair, memory.
pub(super) struct Peer {
    /// Per part, a window over this worker's slot of it: bound (lent to the worker) or not.
    pub(super) windows: Vec<MemoryWindow>,
    pub(super) qp: QueuePair,
    /// Per part, whether its window is bound: the worker may write that slot.
    pub(super) lent: Vec<bool>,
    /// Window number (the key without its low byte) -> part.
    pub(super) by_window: HashMap<u32, Key>,
    /// Where each posted receive takes a push's clock stamp (one stamp per receive).
    pub(super) inbox: MemoryRegion<Vec<u8>>,
    /// Per part, this worker's slot of it, registered for binding its window only: no region's
    /// own key is handed out, so a slot is writable only through its bound window. One region
    /// per slot, not one per block, because some devices (rxe) check a window's writes against
    /// the region it is bound over rather than against the window.
    pub(super) slots: Vec<MemoryRegion<ExternalMemory>>,
    /// The worker has connected its queue pair and posted its receives: it has joined.
    pub(super) ready: bool,
    /// The worker's model buffer (laid out as the arena's blocks).
    pub(super) models: RemoteBuffer,
    /// Model writes posted and not completed, in posting order (completions come in order).
    pub(super) inflight: VecDeque<(Key, Version)>,
    /// Model writes waiting for room in the send queue.
    pub(super) backlog: VecDeque<Key>,
}

impl Peer {
    /// Posts receive `i`, which takes a push's stamp into its own place in the inbox.
    pub(super) fn post_recv(&self, rank: Rank, i: u32) -> Result<(), VerbsError> {
        let at = i as usize * STAMP_LEN;
        // SAFETY: the inbox lives as long as the peer, whose queue pair (declared before it) is
        // destroyed before it; its stamp `i` is read only after this receive's completion, and
        // re-posted only after that read.
        unsafe {
            self.qp
                .post_recv(wr_id(rank, u64::from(i)), &self.inbox, at..at + STAMP_LEN)
        }
    }

    /// Lends worker `rank`'s slot of part `key` to it: binds the part's window over the slot's
    /// data, so the worker may write it until its push gives the window back.
    pub(super) fn lend(&mut self, rank: Rank, key: Key) -> Result<(), VerbsError> {
        let slot = &self.slots[key as usize];
        let window = &mut self.windows[key as usize];
        // SAFETY: the slot block stays mapped while the server lives (the registration's
        // contract), and the window is deallocated (field order) before the registration. The
        // server reads the slot only once it holds it, after the worker's push invalidated the
        // window (on_recv checks that it did).
        unsafe {
            self.qp.post_bind(
                wr_id(rank, BIND_WR | u64::from(key)),
                window,
                slot,
                0..slot.addr_len().1,
                Access::REMOTE_WRITE,
            )?
        };
        self.lent[key as usize] = true;
        Ok(())
    }
}

/// A work-request id: the worker's rank above, the request's own number below.
pub(super) fn wr_id(rank: Rank, n: u64) -> u64 {
    (u64::from(rank) << 32) | n
}
