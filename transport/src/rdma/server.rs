//! The server side of the RDMA transport: the channel's [`ServerEnd`] for control, plus a queue
//! pair per RDMA worker whose receive completions (one per pushed part) wake the same epoll loop
//! through the completion channel. Workers that did not ask for RDMA keep using TCP.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hetsync_ffi::{
    Access, Completed, Completion, CompletionQueue, Endpoint, ExternalMemory, Gid, MemoryRegion,
    MemoryWindow, ProtectionDomain, QpCaps, RemoteBuffer, SendOp, VerbsError,
};

use super::peer::{wr_id, Peer};
use super::{
    random_psn, Local, RdmaConfig, BIND_WR, MAX_INFLIGHT, RECV_DEPTH, SEND_DEPTH, STAMP_WR,
};
use crate::channel::{ListenConfig, ServerEnd};
use crate::protocol::rdma::{model_imm, STAMP_LEN};
use crate::protocol::{FrameKind, RdmaAccept, RdmaParams, MAX_RDMA_PARTS};
use crate::{Arena, ArenaPin, Event, Key, Rank, SlotState, Transport, TransportError, Version};

/// How long `release` waits for writes reading a version before dropping their peers (it
/// stalls the event loop, but a write may queue behind a hundred others on a busy link).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The RDMA transport, server side. Field order is teardown order: queue pairs and
/// registrations before the CQs, PD and device, and the pin that keeps the registered arena
/// memory mapped last of all.
pub struct RdmaServer {
    peers: Vec<Option<Peer>>,
    /// Queue pair number -> rank, for the receive completions of pushes.
    by_qpn: HashMap<u32, Rank>,
    arena_mr: MemoryRegion<ExternalMemory>,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    pd: ProtectionDomain,
    local: Local,
    completions: Vec<Completion>,
    end: ServerEnd,
    /// The arena registered: every call must lend this one.
    arena: ArenaPin,
}

impl std::fmt::Debug for RdmaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaServer")
            .field("device", &self.local.describe())
            .field("rdma_peers", &self.peers.iter().flatten().count())
            .finish()
    }
}

/// Registers `arena[range]` in place. The registration must not outlive `pin` (a field of the
/// same [`RdmaServer`], declared after every registration).
fn register(
    pd: &ProtectionDomain,
    arena: &mut Arena,
    range: std::ops::Range<usize>,
    access: Access,
) -> Result<MemoryRegion<ExternalMemory>, VerbsError> {
    assert!(range.end <= arena.len());
    // SAFETY: the range lies inside the arena's mapping, which never moves and stays mapped while
    // a pin of it lives; the RdmaServer holding this registration holds a pin and drops it after
    // every registration (field order).
    let mem = unsafe { ExternalMemory::new(arena.base_ptr().add(range.start), range.len()) };
    pd.register(mem, access)
}

impl RdmaServer {
    /// Listens like the TCP transport, opens the RDMA device and registers `arena` (keeping its
    /// memory mapped for as long as the transport lives). Every later call must lend this arena.
    pub fn bind(
        cfg: &ListenConfig,
        arena: &mut Arena,
        rdma: &RdmaConfig,
    ) -> Result<Self, TransportError> {
        let local = Local::open(rdma)?;
        let mut end = ServerEnd::bind(cfg)?;
        let pd = local.ctx.alloc_pd()?;
        // Room for every completion the queue pairs can have outstanding: a CQ that overflows
        // breaks every queue pair on it.
        let workers = cfg.workers.max(1) as i32;
        let send_cq = local
            .ctx
            .create_cq((workers * SEND_DEPTH as i32 + 64).min(1 << 20), true)?;
        let recv_cq = local
            .ctx
            .create_cq((workers * RECV_DEPTH as i32 + 64).min(1 << 20), true)?;
        // Both wake the event loop (receives are pushes, send completions free send room).
        for cq in [&send_cq, &recv_cq] {
            end.watch(channel_fd(cq.fd().expect("created with a channel")))?;
            cq.arm()?;
        }
        let all = 0..arena.len();
        let arena_mr = register(&pd, arena, all, Access::LOCAL_WRITE)?;
        Ok(Self {
            peers: (0..cfg.workers).map(|_| None).collect(),
            by_qpn: HashMap::new(),
            arena_mr,
            send_cq,
            recv_cq,
            pd,
            local,
            completions: Vec::new(),
            end,
            arena: arena.pin(),
        })
    }

    /// The address the control channel listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.end.local_addr()
    }

    /// The device, port and GID in use.
    pub fn describe(&self) -> String {
        self.local.describe()
    }

    /// Sets up the queue pair for a worker that offered RDMA, and answers it. The worker joins
    /// once it says it is ready ([`on_ready`](Self::on_ready)).
    fn accept(&mut self, arena: &mut Arena, rank: Rank, payload: &[u8]) -> Result<(), String> {
        let offer = RdmaParams::decode(payload).map_err(|e| e.to_string())?;
        if offer.is_unable() {
            return Err("the worker could not set up RDMA on its side (its log says why)".into());
        }
        if self.peers[rank as usize].is_some() {
            return Err("a second RDMA offer on one connection".into());
        }
        let want = arena.block_layout().len() as u64;
        if offer.len < want {
            return Err(format!(
                "the worker's model buffer is {} bytes, the job needs {want}",
                offer.len
            ));
        }
        let parts = arena.parts().len();
        if parts > MAX_RDMA_PARTS {
            return Err(format!("the job has {parts} parts, RDMA takes at most {MAX_RDMA_PARTS} (a window each): use a larger --partition-kib"));
        }
        let verbs = |e: VerbsError| e.to_string();
        let mut qp = self
            .pd
            .create_rc_qp(
                &self.send_cq,
                &self.recv_cq,
                QpCaps {
                    max_send: SEND_DEPTH,
                    max_recv: RECV_DEPTH,
                },
            )
            .map_err(verbs)?;
        let block = arena.worker_block(rank);
        let layout = arena.block_layout().clone();
        let slots = (0..parts as Key)
            .map(|k| {
                let data = layout.data(k);
                let at = block.start + data.start..block.start + data.end;
                register(&self.pd, arena, at, Access::LOCAL_WRITE | Access::MW_BIND)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{e} (a region per part: {parts} for this worker)"))?;
        let windows = (0..parts)
            .map(|_| self.pd.alloc_mw())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{e} (a window per part: {parts} for this worker)"))?;
        let by_window = windows
            .iter()
            .enumerate()
            .map(|(k, w)| (w.rkey() >> 8, k as Key))
            .collect();
        let inbox = self
            .pd
            .register(
                vec![0u8; RECV_DEPTH as usize * STAMP_LEN],
                Access::LOCAL_WRITE,
            )
            .map_err(verbs)?;
        let psn = random_psn();
        let remote = Endpoint {
            qpn: offer.qpn,
            psn: offer.psn,
            gid: Gid(offer.gid),
            lid: offer.lid,
        };
        qp.connect(self.local.path, psn, &remote).map_err(verbs)?;
        let peer = Peer {
            windows,
            qp,
            lent: vec![false; parts],
            by_window,
            inbox,
            slots,
            models: RemoteBuffer {
                addr: offer.addr,
                len: offer.len,
                rkey: offer.rkey,
            },
            inflight: VecDeque::new(),
            backlog: VecDeque::new(),
            ready: false,
        };
        // Receives need a connected (INIT or later) queue pair, and must be there before the
        // worker learns where to write.
        for i in 0..RECV_DEPTH {
            peer.post_recv(rank, i).map_err(verbs)?;
        }
        // Nothing is lent yet: the join's model of each part lends its slot (post_model binds
        // the window first, within that write's share of the send queue), and the worker pushes
        // a part only after its model.
        let reply = RdmaAccept {
            params: RdmaParams {
                qpn: peer.qp.qpn(),
                psn,
                lid: self.local.lid,
                gid: self.local.gid.0,
                addr: (arena.base_ptr() as u64) + block.start as u64,
                len: block.len() as u64,
                rkey: 0,
            },
            windows: peer.windows.iter().map(MemoryWindow::rkey).collect(),
        };
        self.end
            .send_control(arena, rank, FrameKind::RdmaConnect, &reply.encode());
        self.remove_peer(arena, rank);
        self.by_qpn.insert(peer.qp.qpn(), rank);
        self.peers[rank as usize] = Some(peer);
        Ok(())
    }

    /// Worker `rank` has connected its queue pair and posted its receives (an empty offer after
    /// the answer): only now may models be written to it, so only now has it joined.
    fn on_ready(&mut self, arena: &mut Arena, rank: Rank) {
        match self.peers[rank as usize].as_mut() {
            Some(peer) if !peer.ready => {
                peer.ready = true;
                self.end.complete_join(rank);
            }
            _ => {
                let why = "said it was ready for RDMA without an accepted offer";
                self.remove_peer(arena, rank);
                self.end.disconnect(arena, rank, why);
            }
        }
    }

    /// Tears down worker `rank`'s queue pair and registration (the one place a peer goes): the
    /// NIC stops reading for it, so its writes in flight stop counting as readers.
    fn remove_peer(&mut self, arena: &mut Arena, rank: Rank) -> bool {
        let Some(peer) = self.peers[rank as usize].take() else {
            return false;
        };
        self.by_qpn.remove(&peer.qp.qpn());
        drop(peer.windows);
        drop(peer.qp);
        for (key, version) in peer.inflight {
            arena.end_send(key, version);
        }
        true
    }

    /// Drops worker `rank`'s queue pair, and its control connection with a reason.
    fn drop_peer(&mut self, arena: &mut Arena, rank: Rank, why: &str) {
        if self.remove_peer(arena, rank) {
            self.end.disconnect(arena, rank, why);
        }
    }

    /// Posts worker `rank`'s model write of part `key`: the bind that lends the slot back (when
    /// the server has given it back and the window is not bound yet), its round stamp, then its
    /// data with the part and the window's key byte as the immediate.
    fn post_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        let peer = self.peers[rank as usize].as_mut().expect("an RDMA peer");
        if arena.slot_state(rank, key) == SlotState::Lent && !peer.lent[key as usize] {
            if let Err(e) = peer.lend(rank, key) {
                let why = format!("lending its slot of part {key} failed: {e}");
                return self.drop_peer(arena, rank, &why);
            }
        }
        // The slot is the worker's whenever its model goes out (the server lends, then serves).
        debug_assert!(
            peer.lent[key as usize],
            "a model of part {key} with its slot held"
        );
        let imm = model_imm(key, peer.windows[key as usize].rkey());
        let (version, _) = arena.start_send(key);
        let block = arena.block_layout();
        let (stamp_at, data_at) = (block.stamp(key).start as u64, block.data(key).start as u64);
        let stamp = arena.version_stamp(key, version);
        let data = arena.version_data(key, version);
        // SAFETY: the arena's registration lives until the server drops this transport, and the
        // version read stays unchanged until this write's completion: it counts as a reader
        // (start_send above) until `on_send` or `remove_peer` ends the send.
        let posted = unsafe {
            peer.qp
                .post_send(
                    wr_id(rank, STAMP_WR),
                    SendOp::Write,
                    &self.arena_mr,
                    stamp,
                    Some((peer.models, stamp_at)),
                )
                .and_then(|()| {
                    peer.qp.post_send(
                        wr_id(rank, u64::from(key)),
                        SendOp::WriteWithImm(imm),
                        &self.arena_mr,
                        data,
                        Some((peer.models, data_at)),
                    )
                })
        };
        peer.inflight.push_back((key, version));
        if let Err(e) = posted {
            self.drop_peer(arena, rank, &format!("posting the model write failed: {e}"));
        }
    }

    /// A push arrived: its data is in the slot, its stamp in the inbox, and its send invalidated
    /// the slot's window, which must be the one lent for that part.
    fn on_recv(&mut self, arena: &mut Arena, c: Completion) {
        let Some(&rank) = self.by_qpn.get(&c.qp_num) else {
            return; // a late completion of a peer already dropped
        };
        let (len, invalidated) = match c.result {
            Ok(Completed::Recv { len, invalidated }) => (len as usize, invalidated),
            Ok(other) => {
                return self.drop_peer(arena, rank, &format!("unexpected receive {other:?}"))
            }
            // Its receives are flushed only when its queue pair broke: a write outside what was
            // lent to it, or the link failed.
            Err(e) if e.is_flushed() => {
                let why = "its queue pair failed (a write outside a lent slot, or a broken link)";
                return self.drop_peer(arena, rank, why);
            }
            Err(e) => return self.drop_peer(arena, rank, &format!("RDMA receive failed: {e}")),
        };
        if len != STAMP_LEN {
            return self.drop_peer(arena, rank, &format!("a push's stamp has {len} bytes"));
        }
        let peer = self.peers[rank as usize].as_mut().expect("found by qpn");
        let Some(rkey) = invalidated else {
            let why =
                "pushed without giving its slot back (a push's send must invalidate the window)";
            return self.drop_peer(arena, rank, why);
        };
        let key = match peer.by_window.get(&(rkey >> 8)) {
            Some(&key) if peer.lent[key as usize] && peer.windows[key as usize].rkey() == rkey => {
                key
            }
            _ => return self.drop_peer(arena, rank, "gave back a window it was not lent"),
        };
        peer.lent[key as usize] = false;
        let at = (c.wr_id & 0xffff_ffff) as usize * STAMP_LEN;
        let addr = peer.inbox.address_of(&(at..at + STAMP_LEN)) as *const [u8; STAMP_LEN];
        // SAFETY: stamp `at` lies in the inbox, which lives as long as the peer; its receive
        // completed and is not re-posted yet, so the NIC is not writing it (it may be writing
        // other stamps: no reference to the whole inbox is made).
        let clock = u64::from_le_bytes(unsafe { std::ptr::read_volatile(addr) });
        if let Err(e) = peer.post_recv(rank, (c.wr_id & 0xffff_ffff) as u32) {
            return self.drop_peer(arena, rank, &format!("reposting a receive failed: {e}"));
        }
        if let Err(e) = arena.hand_over(rank, key, clock) {
            return self.drop_peer(arena, rank, &e.to_string());
        }
        self.end.report(Event::Pushed { rank, key, clock });
    }

    fn on_send(&mut self, arena: &mut Arena, c: Completion) {
        let Some(&rank) = self
            .by_qpn
            .get(&c.qp_num)
            .filter(|&&r| r == (c.wr_id >> 32) as Rank)
        else {
            return; // a late completion of a queue pair already destroyed
        };
        let peer = self.peers[rank as usize].as_mut().expect("found by qpn");
        if let Err(e) = c.result {
            let why = if e.is_flushed() {
                "its queue pair failed (a write outside a lent slot, or a broken link)".to_string()
            } else if c.wr_id & BIND_WR != 0 {
                format!("lending it a slot failed: {e}")
            } else {
                format!("writing the model failed: {e}")
            };
            return self.drop_peer(arena, rank, &why);
        }
        if c.wr_id & (STAMP_WR | BIND_WR) != 0 {
            return;
        }
        let Some((key, version)) = peer.inflight.pop_front() else {
            return self.drop_peer(arena, rank, "a model write completed twice");
        };
        arena.end_send(key, version);
        if let Some(next) = peer.backlog.pop_front() {
            self.post_model(arena, rank, next);
        }
    }

    /// Takes every completion there is (without waiting).
    fn reap(&mut self, arena: &mut Arena) -> Result<(), TransportError> {
        self.completions.clear();
        self.send_cq.poll(&mut self.completions, usize::MAX)?;
        for c in std::mem::take(&mut self.completions) {
            self.on_send(arena, c);
        }
        self.recv_cq.poll(&mut self.completions, usize::MAX)?;
        for c in std::mem::take(&mut self.completions) {
            self.on_recv(arena, c);
        }
        Ok(())
    }
}

/// Borrows the completion channel's fd for registration in epoll.
fn channel_fd(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: the completion channel's fd stays open for as long as the server (which holds the
    // CQ) lives; epoll only records the number and the registration ends when the fd closes.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

impl Transport for RdmaServer {
    fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        assert!(
            arena.is_pinned_by(&self.arena),
            "an RDMA transport must be lent the arena it registered"
        );
        self.end.poll(arena, events, deadline)?;
        for ev in events.iter() {
            if let Event::Left { rank, .. } = ev {
                self.remove_peer(arena, *rank);
            }
        }
        for rank in self.end.take_abandoned() {
            self.remove_peer(arena, rank);
        }
        for (rank, payload) in self.end.take_offers() {
            if !self.end.joining(rank) {
                continue; // its connection ended in this very poll (and was abandoned above)
            }
            if payload.is_empty() {
                self.on_ready(arena, rank);
            } else if self.peers[rank as usize].is_some() {
                let why = "made a second RDMA offer on one connection";
                self.remove_peer(arena, rank);
                self.end.disconnect(arena, rank, why);
            } else if let Err(why) = self.accept(arena, rank, &payload) {
                // The worker goes on over TCP if it may (auto); one that insists on RDMA leaves.
                self.remove_peer(arena, rank);
                self.end.report(Event::Refused {
                    peer: format!("worker {rank}"),
                    reason: format!("RDMA setup failed, offering TCP instead: {why}"),
                });
                self.end.decline_offer(arena, rank);
            }
        }
        if self.end.take_watch_ready() {
            for cq in [&self.send_cq, &self.recv_cq] {
                cq.ack_events()?;
                cq.arm()?;
            }
        }
        // Polled after arming: nothing that arrived in between is missed. What this finds is
        // delivered by the next poll, which then does not wait.
        self.reap(arena)
    }

    fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        let Some(peer) = self.peers.get_mut(rank as usize).and_then(Option::as_mut) else {
            return self.end.send_model(arena, rank, key);
        };
        if !peer.ready {
            // Not joined yet (a reply to an earlier connection's push): its join is served whole.
            return;
        }
        if peer.inflight.len() >= MAX_INFLIGHT as usize || !peer.backlog.is_empty() {
            peer.backlog.push_back(key);
            return;
        }
        self.post_model(arena, rank, key);
    }

    fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
        self.end.release(arena, key, version);
        // The NIC finishes reading in microseconds unless a peer is broken: wait for it, bounded.
        let deadline = Instant::now() + DRAIN_LIMIT;
        while arena.readers(key, version) > 0 {
            if self.reap(arena).is_err() || Instant::now() > deadline {
                let stuck: Vec<Rank> = (0..self.peers.len() as Rank)
                    .filter(|&r| {
                        self.peers[r as usize].as_ref().is_some_and(|p| {
                            p.inflight.iter().any(|&(k, v)| k == key && v == version)
                        })
                    })
                    .collect();
                for r in stuck {
                    self.drop_peer(arena, r, "its model write did not complete");
                }
                break;
            }
            std::hint::spin_loop();
        }
    }

    fn disconnect(&mut self, arena: &mut Arena, rank: Rank, why: &str) {
        self.remove_peer(arena, rank);
        self.end.disconnect(arena, rank, why);
    }

    fn shutdown(&mut self, arena: &mut Arena, grace: Duration) {
        // Let model writes finish (bounded), then say goodbye over the control connections.
        let deadline = Instant::now() + grace.min(DRAIN_LIMIT);
        while self.peers.iter().flatten().any(|p| !p.inflight.is_empty())
            && Instant::now() < deadline
        {
            if self.reap(arena).is_err() {
                break;
            }
            std::hint::spin_loop();
        }
        self.end.shutdown(arena, grace);
        for rank in 0..self.peers.len() as Rank {
            self.remove_peer(arena, rank);
        }
    }

    fn answer_status(&mut self, arena: &mut Arena, request: u64, report: &[u8]) {
        self.end.answer_status(arena, request, report);
    }

    fn peer(&self, rank: Rank) -> Option<crate::PeerInfo> {
        let mut info = self.end.peer(rank)?;
        if self.peers.get(rank as usize).is_some_and(Option::is_some) {
            info.transport = "rdma";
        }
        Some(info)
    }
}
