//! The server side of the RDMA transport: the TCP server for control, plus a queue pair per
//! RDMA worker whose receive completions (one per pushed gradient) wake the same epoll loop
//! through the completion channel. Workers that did not ask for RDMA keep using TCP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hetsync_ffi::{
    Access, Completed, Completion, CompletionQueue, Endpoint, ExternalMemory, Gid, MemoryRegion,
    ProtectionDomain, QpCaps, QueuePair, RemoteBuffer, SendOp, VerbsError,
};

use super::{random_psn, Local, RdmaConfig, RECV_DEPTH};
use crate::protocol::{decode_imm, encode_imm, FrameKind, RdmaParams, MAX_RDMA_KEYS};
use crate::tcp::{TcpServer, TcpServerConfig};
use crate::{Event, Rank, SlotRegion, Transport, TransportError};

/// How long `region_mut` waits for model writes in flight before dropping their peers.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// One RDMA-connected worker. The queue pair goes first, then the slot registrations.
struct Peer {
    qp: QueuePair,
    slots: Vec<MemoryRegion<ExternalMemory>>,
    models: Vec<RemoteBuffer>,
    /// A push arrived and its reply was not sent: a second push is a protocol violation.
    slot_busy: bool,
    /// Round stamped on the last model sent: decodes the 24-bit clocks of its pushes.
    last_round: u64,
    /// Model writes posted and not completed.
    inflight: usize,
}

/// The RDMA transport, server side. Field order is teardown order: queue pairs and
/// registrations before the CQs, PD and device, and all of them before the TCP server, which
/// owns the registered memory.
pub struct RdmaServer {
    peers: Vec<Option<Peer>>,
    /// Queue pair number -> rank, for the receive completions of pushes.
    by_qpn: HashMap<u32, Rank>,
    model_mrs: Vec<MemoryRegion<ExternalMemory>>,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    pd: ProtectionDomain,
    local: Local,
    completions: Vec<Completion>,
    pending: Vec<Event>,
    tcp: TcpServer,
}

impl std::fmt::Debug for RdmaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaServer")
            .field("device", &self.local.describe())
            .field("rdma_peers", &self.peers.iter().flatten().count())
            .finish()
    }
}

impl RdmaServer {
    /// Listens like [`TcpServer::bind`] and opens the RDMA device.
    pub fn bind(cfg: &TcpServerConfig, rdma: &RdmaConfig) -> Result<Self, TransportError> {
        if cfg.dims.len() > MAX_RDMA_KEYS {
            return Err(TransportError::Rdma(VerbsError::NoDevice(format!(
                "{} keys, more than the {MAX_RDMA_KEYS} RDMA can carry",
                cfg.dims.len()
            ))));
        }
        let local = Local::open(rdma)?;
        let mut tcp = TcpServer::bind(cfg)?;
        tcp.enable_rdma_requests();
        let pd = local.ctx.alloc_pd()?;
        // Room for every receive any worker keeps posted, and for a model write to each: a CQ
        // that overflows breaks every queue pair on it.
        let workers = cfg.workers.max(1) as i32;
        let keys = cfg.dims.len() as i32;
        let send_cq = local
            .ctx
            .create_cq((workers * keys * 2 + 64).min(1 << 20), false)?;
        let recv_cq = local
            .ctx
            .create_cq((workers * RECV_DEPTH as i32 + 64).min(1 << 20), true)?;
        let fd = recv_cq.fd().expect("created with a channel");
        tcp.watch(channel_fd(fd))?;
        recv_cq.arm()?;
        let region = tcp.region_mut();
        let base = region.as_mut_ptr();
        let mut model_mrs = Vec::new();
        for key in 0..cfg.dims.len() {
            let r = region.layout().model_range(key);
            // SAFETY: the model lies inside the region, which `tcp` owns and drops after every
            // registration (field order of RdmaServer).
            let mem = unsafe { ExternalMemory::new(base.add(r.start), r.len()) };
            model_mrs.push(pd.register(mem, Access::LOCAL_WRITE)?);
        }
        Ok(Self {
            peers: (0..cfg.workers).map(|_| None).collect(),
            by_qpn: HashMap::new(),
            model_mrs,
            send_cq,
            recv_cq,
            pd,
            local,
            completions: Vec::new(),
            pending: Vec::new(),
            tcp,
        })
    }

    /// The address the control channel listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.tcp.local_addr()
    }

    /// The device, port and GID in use.
    pub fn describe(&self) -> String {
        self.local.describe()
    }

    /// Sets up the queue pair for a worker that offered RDMA, and answers it.
    fn accept(&mut self, rank: Rank, payload: &[u8]) -> Result<(), String> {
        let offer = RdmaParams::decode(payload).map_err(|e| e.to_string())?;
        let keys = self.model_mrs.len();
        if offer.buffers.len() != keys {
            return Err(format!(
                "the worker offered {} model buffers for {keys} keys",
                offer.buffers.len()
            ));
        }
        for (k, &(_, len, _)) in offer.buffers.iter().enumerate() {
            let want = self.model_mrs[k].addr_len().1 as u64;
            if len < want {
                return Err(format!("model buffer {k} is {len} bytes, the model {want}"));
            }
        }
        let verbs = |e: VerbsError| e.to_string();
        let mut qp = self
            .pd
            .create_rc_qp(
                &self.send_cq,
                &self.recv_cq,
                QpCaps {
                    max_send: 64,
                    max_recv: RECV_DEPTH,
                },
            )
            .map_err(verbs)?;
        let region = self.tcp.region_mut();
        let base = region.as_mut_ptr();
        let mut slots = Vec::with_capacity(keys);
        for key in 0..keys {
            let r = region.layout().slot_range(rank as usize, key);
            // SAFETY: the slot lies inside the region, which outlives every registration.
            let mem = unsafe { ExternalMemory::new(base.add(r.start), r.len()) };
            slots.push(
                self.pd
                    .register(mem, Access::LOCAL_WRITE | Access::REMOTE_WRITE)
                    .map_err(verbs)?,
            );
        }
        let psn = random_psn();
        let remote = Endpoint {
            qpn: offer.qpn,
            psn: offer.psn,
            gid: Gid(offer.gid),
            lid: offer.lid,
        };
        qp.connect(self.local.path, psn, &remote).map_err(verbs)?;
        // Receives need a connected (INIT or later) queue pair, and must be there before the
        // worker learns where to write.
        for i in 0..RECV_DEPTH {
            qp.post_recv_imm(wr_id(rank, u64::from(i))).map_err(verbs)?;
        }
        let reply = RdmaParams {
            qpn: qp.qpn(),
            psn,
            lid: self.local.lid,
            gid: self.local.gid.0,
            buffers: slots
                .iter()
                .map(|s| {
                    let b = s.remote(0..s.addr_len().1);
                    (b.addr, b.len, b.rkey)
                })
                .collect(),
        };
        self.tcp
            .send_control(rank, FrameKind::RdmaConnect, &reply.encode());
        self.tcp.complete_join(rank);
        self.remove_peer(rank);
        self.by_qpn.insert(qp.qpn(), rank);
        self.peers[rank as usize] = Some(Peer {
            qp,
            slots,
            models: offer
                .buffers
                .iter()
                .map(|&(addr, len, rkey)| RemoteBuffer { addr, len, rkey })
                .collect(),
            slot_busy: false,
            last_round: 0,
            inflight: 0,
        });
        Ok(())
    }

    /// Tears down worker `rank`'s queue pair and registrations (the one place a peer goes).
    fn remove_peer(&mut self, rank: Rank) -> bool {
        match self.peers[rank as usize].take() {
            Some(peer) => {
                self.by_qpn.remove(&peer.qp.qpn());
                true
            }
            None => false,
        }
    }

    /// Drops worker `rank`'s queue pair and registrations, and its control connection.
    fn drop_peer(&mut self, rank: Rank, why: &str) {
        if self.remove_peer(rank) {
            self.tcp.disconnect(rank, why);
        }
    }

    fn on_recv(&mut self, c: Completion) {
        let Some(&rank) = self.by_qpn.get(&c.qp_num) else {
            return; // a late completion of a peer already dropped
        };
        let peer = self.peers[rank as usize].as_mut().expect("found by qpn");
        let (len, imm) = match c.result {
            Ok(Completed::RecvRdmaWithImm { len, imm }) => (len, imm),
            Ok(other) => return self.drop_peer(rank, &format!("unexpected receive {other:?}")),
            Err(e) if e.is_flushed() => return,
            Err(e) => return self.drop_peer(rank, &format!("RDMA receive failed: {e}")),
        };
        let (key, clock) = decode_imm(imm, peer.last_round);
        let Some(slot) = peer.slots.get(key as usize) else {
            return self.drop_peer(rank, &format!("push for key {key}, the job has fewer"));
        };
        if len as usize != slot.addr_len().1 {
            let want = slot.addr_len().1;
            return self.drop_peer(rank, &format!("push of {len} bytes, the tensor is {want}"));
        }
        if peer.slot_busy {
            return self.drop_peer(
                rank,
                "pushed while the previous push was still being aggregated (wait for the model)",
            );
        }
        peer.slot_busy = true;
        if let Err(e) = peer.qp.post_recv_imm(c.wr_id) {
            return self.drop_peer(rank, &format!("reposting a receive failed: {e}"));
        }
        self.pending.push(Event::Pushed { rank, key, clock });
    }

    fn on_send(&mut self, c: Completion) {
        let rank = (c.wr_id >> 32) as Rank;
        let Some(peer) = self.peers.get_mut(rank as usize).and_then(Option::as_mut) else {
            return;
        };
        peer.inflight = peer.inflight.saturating_sub(1);
        if let Err(e) = c.result {
            if !e.is_flushed() {
                self.drop_peer(rank, &format!("writing the model failed: {e}"));
            }
        }
    }

    /// Takes every completion there is (without waiting).
    fn reap(&mut self) -> Result<(), TransportError> {
        self.completions.clear();
        self.send_cq.poll(&mut self.completions, usize::MAX)?;
        for c in std::mem::take(&mut self.completions) {
            self.on_send(c);
        }
        self.recv_cq.poll(&mut self.completions, usize::MAX)?;
        for c in std::mem::take(&mut self.completions) {
            self.on_recv(c);
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

fn wr_id(rank: Rank, n: u64) -> u64 {
    (u64::from(rank) << 32) | n
}

impl Transport for RdmaServer {
    fn region(&self) -> &SlotRegion {
        self.tcp.region()
    }

    fn region_mut(&mut self) -> &mut SlotRegion {
        // The model may change now: wait until the NIC has finished reading it for every write
        // in flight; a peer that does not complete in time is dropped.
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.peers.iter().flatten().any(|p| p.inflight > 0) {
            if self.reap().is_err() || Instant::now() > deadline {
                let stuck: Vec<Rank> = (0..self.peers.len() as Rank)
                    .filter(|&r| {
                        self.peers[r as usize]
                            .as_ref()
                            .is_some_and(|p| p.inflight > 0)
                    })
                    .collect();
                for r in stuck {
                    self.drop_peer(r, "its model write did not complete");
                }
                break;
            }
            std::hint::spin_loop();
        }
        self.tcp.region_mut()
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let timeout = crate::wait_for(&self.pending, timeout);
        self.tcp.poll(events, timeout)?;
        for ev in events.iter() {
            if let Event::Left { rank, .. } = ev {
                self.remove_peer(*rank);
            }
        }
        for (rank, payload) in self.tcp.take_rdma_requests() {
            if let Err(why) = self.accept(rank, &payload) {
                // The worker goes on over TCP if it may (auto); one that insists on RDMA leaves.
                self.remove_peer(rank);
                self.pending.push(Event::Refused {
                    peer: format!("worker {rank}"),
                    reason: format!("RDMA setup failed, offering TCP instead: {why}"),
                });
                self.tcp.decline_rdma(rank);
            }
        }
        if self.tcp.take_watch_ready() {
            self.recv_cq.ack_events()?;
            self.recv_cq.arm()?;
        }
        // Polled after arming: nothing that arrived in between is missed.
        self.reap()?;
        events.append(&mut self.pending);
        Ok(())
    }

    fn send_model(&mut self, rank: Rank, key: u32, round: u64) {
        let Some(peer) = self.peers.get_mut(rank as usize).and_then(Option::as_mut) else {
            return self.tcp.send_model(rank, key, round);
        };
        peer.slot_busy = false;
        peer.last_round = round;
        let mr = &self.model_mrs[key as usize];
        let len = mr.addr_len().1;
        let target = peer.models[key as usize];
        // SAFETY: the model's registration lives until the server drops, and `region_mut` (the
        // only way to change the model) waits for this write's completion first.
        let posted = unsafe {
            peer.qp.post_send(
                wr_id(rank, round),
                SendOp::WriteWithImm(encode_imm(key, round)),
                mr,
                0..len,
                Some((target, 0)),
            )
        };
        match posted {
            Ok(()) => peer.inflight += 1,
            Err(e) => self.drop_peer(rank, &format!("posting the model write failed: {e}")),
        }
    }

    fn disconnect(&mut self, rank: Rank, why: &str) {
        self.remove_peer(rank);
        self.tcp.disconnect(rank, why);
    }

    fn shutdown(&mut self, grace: Duration) {
        // Let model writes finish, then say goodbye over the control connections.
        let _ = self.region_mut();
        self.tcp.shutdown(grace);
        for rank in 0..self.peers.len() as Rank {
            self.remove_peer(rank);
        }
    }
}
