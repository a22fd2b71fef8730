//! The server end of the TCP channel: the listening socket, every connection's framing and output
//! queue, the handshake, and TCP pushes and models. Both transports stand on it: TCP moves all
//! data here; RDMA uses it for the handshake, the exchange of RDMA parameters (handed up as
//! offers) and liveness, and for workers without RDMA.
//!
//! One thread, non-blocking sockets (socket2), level-triggered readiness ([`Reactor`]). A push's
//! payload is read straight into the worker's slot of the [`Arena`]; a model goes out by `writev`
//! from the arena ([`Outbox`]). A slow peer costs at most its own queue, never time for the
//! others; a broken or malformed peer is dropped alone.
//!
//! Everything a peer can make the server hold is bounded before it is allocated: connections
//! that have not joined ([`Limits`], oldest dropped first, a handshake deadline; `accept.rs`),
//! frames (a push is exactly its part, control frames are small; [`crate::protocol`]), and each
//! peer's output (at most twice the model queued, and a write deadline).

mod accept;
mod join;
pub(super) use join::STATUS;
mod shutdown;

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::admission::{Admission, Limits};
use super::connection::{Connection, Frame, Target};
use super::outbox::Outbox;
use super::reactor::{Reactor, Ready, LISTENER, WATCH};
use super::socket::{listen, read_nonblocking};
use crate::auth::Secret;
use crate::protocol::{FrameKind, ProtocolError, PushClock};
use crate::{Arena, Event, Key, LeaveReason, PeerError, Rank, TransportError, Version};
use accept::SWEEP;

/// Reads per readiness event before moving on to other peers (level-triggered: the rest waits).
const READS_PER_WAKEUP: usize = 16;
/// How long a peer's queued output may make no progress before it is dropped, by default.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the server end needs to know about the job.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// Address to listen on; port 0 picks a free port (see [`ServerEnd::local_addr`]).
    pub listen: SocketAddr,
    /// Number of workers; ranks are `0..workers`.
    pub workers: usize,
    /// What the clock of a push means on this job (told to every worker in the welcome).
    pub push_clock: PushClock,
    /// Connections that have not joined: how many, from one address, for how long.
    pub limits: Limits,
    /// How long a peer's queued output may make no progress before it is dropped.
    pub write_timeout: Duration,
    /// How long the event loop polls before it sleeps (see [`crate::default_spin`]).
    pub spin: Duration,
    /// The job's shared secret: when set, a worker must prove it knows it before it is
    /// admitted (see [`crate::auth`]).
    pub secret: Option<Arc<Secret>>,
}

impl ListenConfig {
    /// A job of `workers` workers on `listen`, with the default limits.
    pub fn new(listen: SocketAddr, workers: usize, push_clock: PushClock) -> Self {
        Self {
            listen,
            workers,
            push_clock,
            limits: Limits::for_workers(workers),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            spin: crate::default_spin(),
            secret: None,
        }
    }
}

#[derive(Debug)]
struct Peer {
    stream: TcpStream,
    token: u64,
    addr: String,
    rank: Option<Rank>,
    conn: Connection,
    out: Outbox,
    /// EPOLLOUT is in the interest set.
    want_write: bool,
    /// The hello announced an RDMA offer: the join is reported once the offer is answered.
    join_pending: bool,
    /// The worker's data moves over RDMA (it offered, and the offer was not declined): a push
    /// over TCP would write a slot whose window may still be bound, so it is refused.
    rdma_data: bool,
    /// Since when queued output has made no progress, if it has not all gone out.
    stalled_since: Option<Instant>,
    /// A hello waiting for the answer to the server's challenge.
    challenged: Option<Box<join::Challenged>>,
    /// Close once everything queued has gone out (a status report).
    close_when_sent: bool,
}

impl Peer {
    fn io_err(&self, op: &'static str, source: io::Error) -> PeerError {
        PeerError::Io {
            op,
            peer: self.addr.clone(),
            source,
        }
    }

    fn proto_err(&self, source: ProtocolError) -> PeerError {
        PeerError::Protocol {
            peer: self.addr.clone(),
            source,
        }
    }
}

/// One step of reading a connection.
enum ReadStep {
    /// The socket has nothing more right now.
    WouldBlock,
    /// Some bytes arrived, possibly completing a frame.
    Progress(Option<Frame>),
}

/// The server end of the channel: listening socket, every connection's framing and output
/// queue, the handshake, and TCP pushes and models (see [`crate::channel`]).
#[derive(Debug)]
pub struct ServerEnd {
    reactor: Reactor,
    listener: TcpListener,
    local: SocketAddr,
    peers: Vec<Option<Peer>>,
    free: Vec<usize>,
    next_gen: u64,
    by_rank: Vec<Option<usize>>,
    workers: usize,
    push_clock: PushClock,
    /// Events produced outside `poll` (failed sends, disconnects), delivered by the next poll.
    pending: Vec<Event>,
    /// RDMA offers (rank, payload) for a transport on top to answer.
    offers: Vec<(Rank, Vec<u8>)>,
    /// Ranks whose connection ended while their join was pending (an offer being answered).
    abandoned: Vec<Rank>,
    /// The watched fd became readable.
    watch_ready: bool,
    ready: Vec<Ready>,
    /// Connections that have not joined yet.
    admission: Admission,
    /// Peers with `stalled_since` set.
    stalled: usize,
    /// When peers are next checked against `write_timeout`.
    next_sweep: Instant,
    write_timeout: Duration,
    /// Accepting is paused until then (after running out of file descriptors).
    accept_paused: Option<Instant>,
    /// The next pause's length.
    backoff: Duration,
    /// Most bytes a peer may have queued (twice the model and some), set on first use.
    max_queued: Option<usize>,
    secret: Option<Arc<Secret>>,
}

impl ServerEnd {
    /// Starts listening.
    pub fn bind(cfg: &ListenConfig) -> Result<Self, TransportError> {
        let listener = listen(cfg.listen)?;
        let local = listener
            .local_addr()
            .map_err(|e| TransportError::os("getsockname", e))?;
        let mut reactor = Reactor::new()?;
        reactor.set_spin(cfg.spin);
        reactor
            .add_reader(listener.as_fd(), LISTENER)
            .map_err(|e| TransportError::os("epoll_ctl(ADD listener)", e))?;
        Ok(Self {
            reactor,
            listener,
            local,
            peers: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            by_rank: vec![None; cfg.workers],
            workers: cfg.workers,
            push_clock: cfg.push_clock,
            pending: Vec::new(),
            offers: Vec::new(),
            abandoned: Vec::new(),
            watch_ready: false,
            ready: Vec::new(),
            admission: Admission::new(cfg.limits),
            stalled: 0,
            next_sweep: Instant::now() + SWEEP,
            write_timeout: cfg.write_timeout,
            accept_paused: None,
            backoff: Duration::from_millis(50),
            max_queued: None,
            secret: cfg.secret.clone(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Adds `fd` to the event loop: [`poll`](Self::poll) returns when it is readable and
    /// [`take_watch_ready`](Self::take_watch_ready) says so.
    pub fn watch(&mut self, fd: BorrowedFd<'_>) -> Result<(), TransportError> {
        self.reactor
            .add_reader(fd, WATCH)
            .map_err(|e| TransportError::os("epoll_ctl(ADD watched fd)", e))
    }

    /// Ranks whose connection ended, since the last call, before their join completed: no
    /// [`Event::Left`] is reported for them (they never joined), but whatever a transport set
    /// up for their offer must go. Call before [`take_offers`](Self::take_offers).
    pub fn take_abandoned(&mut self) -> Vec<Rank> {
        std::mem::take(&mut self.abandoned)
    }

    /// Whether worker `rank` is connected with its join pending (an offer being answered): an
    /// offer taken from a connection that has ended since is stale.
    pub fn joining(&self, rank: Rank) -> bool {
        self.index(rank)
            .is_some_and(|i| self.peers[i].as_ref().is_some_and(|p| p.join_pending))
    }

    /// Whether the watched fd became readable since the last call.
    pub fn take_watch_ready(&mut self) -> bool {
        std::mem::take(&mut self.watch_ready)
    }

    /// RDMA offers received since the last call: (rank, payload). Each must be answered with
    /// [`send_control`](Self::send_control) and [`complete_join`](Self::complete_join), or
    /// [`decline_offer`](Self::decline_offer).
    pub fn take_offers(&mut self) -> Vec<(Rank, Vec<u8>)> {
        std::mem::take(&mut self.offers)
    }

    /// Queues an event for the next delivery.
    pub fn report(&mut self, ev: Event) {
        self.pending.push(ev);
    }

    /// Waits for readiness until `deadline` (not at all while events are pending), handles it,
    /// and moves every event so far to `events`.
    pub fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        let deadline = if self.pending.is_empty() {
            [deadline, self.next_deadline()].into_iter().flatten().min()
        } else {
            Some(Instant::now())
        };
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        self.reactor.wait(deadline, &mut ready)?;
        let now = Instant::now();
        self.resume_accepting(arena, now);
        self.enforce_deadlines(arena, now);
        for r in &ready {
            match r.token {
                LISTENER => self.accept_all(arena),
                WATCH => self.watch_ready = true,
                token => {
                    let idx = (token & 0xffff_ffff) as usize;
                    let live = |s: &Self| {
                        s.peers
                            .get(idx)
                            .and_then(Option::as_ref)
                            .is_some_and(|p| p.token == token)
                    };
                    if live(self) && r.read {
                        self.on_readable(arena, idx);
                    }
                    if live(self) && r.write {
                        self.flush(arena, idx);
                    }
                }
            }
        }
        self.ready = ready;
        events.append(&mut self.pending);
        Ok(())
    }

    /// Queues part `key`'s current model for worker `rank` (see [`crate::Transport::send_model`]).
    pub fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        let Some(idx) = self.index(rank) else { return };
        let max = *self.max_queued.get_or_insert_with(|| {
            let floats: usize = arena.parts().dims().iter().sum();
            2 * 4 * floats + (1 << 20)
        });
        let p = self.peers[idx].as_mut().expect("live peer");
        p.out.push_model(arena, key);
        self.flush(arena, idx);
        let Some(p) = self.peers[idx].as_ref() else {
            return;
        };
        if p.out.queued() > max {
            let why = format!(
                "more than {} MiB of models queued for it: it pushes but does not read its replies",
                max >> 20
            );
            let e = p.io_err("write", io::Error::new(io::ErrorKind::OutOfMemory, why));
            self.fail(arena, idx, e);
        }
    }

    /// Sends worker `rank` a control frame. A peer that is gone is ignored.
    pub fn send_control(&mut self, arena: &mut Arena, rank: Rank, kind: FrameKind, payload: &[u8]) {
        let Some(idx) = self.index(rank) else { return };
        let p = self.peers[idx].as_mut().expect("live peer");
        p.out.push_control(kind, payload);
        self.flush(arena, idx);
    }

    /// Answers worker `rank`'s RDMA offer with "no" (it carries on over TCP) and reports it as
    /// joined.
    pub fn decline_offer(&mut self, arena: &mut Arena, rank: Rank) {
        if let Some(idx) = self.index(rank) {
            self.peers[idx].as_mut().expect("live peer").rdma_data = false;
        }
        self.send_control(arena, rank, FrameKind::RdmaConnect, &[]);
        self.complete_join(rank);
    }

    /// Reports worker `rank`, whose RDMA offer has been answered, as joined.
    pub fn complete_join(&mut self, rank: Rank) {
        let Some(idx) = self.index(rank) else { return };
        let p = self.peers[idx].as_mut().expect("live peer");
        if std::mem::take(&mut p.join_pending) {
            self.admission.remove(idx);
            self.pending.push(Event::Joined { rank });
        }
    }

    /// Answers status request `request` (see [`crate::Transport::answer_status`]).
    pub fn answer_status(&mut self, arena: &mut Arena, request: u64, report: &[u8]) {
        let idx = (request & 0xffff_ffff) as usize;
        let Some(p) = self.peers.get_mut(idx).and_then(Option::as_mut) else {
            return;
        };
        if p.token != request {
            return;
        }
        p.out.push_control(FrameKind::Status, report);
        p.close_when_sent = true;
        self.flush(arena, idx);
    }

    /// How worker `rank` is connected (over this channel: TCP).
    pub fn peer(&self, rank: Rank) -> Option<crate::PeerInfo> {
        let p = self.peers[self.index(rank)?].as_ref()?;
        Some(crate::PeerInfo {
            addr: p.addr.clone(),
            transport: "tcp",
        })
    }

    /// Drops worker `rank`, telling it why.
    pub fn disconnect(&mut self, arena: &mut Arena, rank: Rank, why: &str) {
        if let Some(idx) = self.index(rank) {
            let reason = LeaveReason::Dropped(why.to_string());
            self.send_error_and_close(arena, idx, why, Some(reason));
        }
    }

    /// Copies what slow readers have not taken of version `version` of part `key` into their
    /// own queues (see [`crate::Transport::release`]).
    pub fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
        for p in self.peers.iter_mut().flatten() {
            p.out.detach(arena, key, version);
        }
    }

    fn index(&self, rank: Rank) -> Option<usize> {
        self.by_rank.get(rank as usize).copied().flatten()
    }

    /// Reads one chunk from peer `idx`: into the connection's own buffer, or straight into the
    /// worker's slot for a push (only while the slot is lent to the worker).
    fn read_step(&mut self, arena: &mut Arena, idx: usize) -> Result<ReadStep, PeerError> {
        let p = self.peers[idx].as_mut().expect("live peer");
        let got = match p.conn.target() {
            Target::Buf(buf) => read_nonblocking(&mut p.stream, buf),
            Target::Slot { .. } if p.rdma_data => {
                return Err(p.proto_err(ProtocolError::Unexpected {
                    kind: FrameKind::Push,
                    when: "over TCP from a worker whose pushes go over RDMA",
                }));
            }
            Target::Slot { key, range } => {
                let rank = p.rank.expect("pushes only after the handshake");
                let Some(slot) = arena.receive_into(rank, key) else {
                    return Err(p.proto_err(ProtocolError::Unexpected {
                        kind: FrameKind::Push,
                        when: "before the reply to the previous push of that part (wait for the model)",
                    }));
                };
                read_nonblocking(&mut p.stream, &mut slot[range])
            }
        };
        let Some(n) = got.map_err(|e| p.io_err("read", e))? else {
            return Ok(ReadStep::WouldBlock);
        };
        if n == 0 {
            return Err(PeerError::Closed {
                peer: p.addr.clone(),
                when: p.conn.at_eof(),
            });
        }
        let frame = p
            .conn
            .advance(n, arena.parts())
            .map_err(|e| p.proto_err(e))?;
        Ok(ReadStep::Progress(frame))
    }

    fn on_readable(&mut self, arena: &mut Arena, idx: usize) {
        for _ in 0..READS_PER_WAKEUP {
            match self.read_step(arena, idx) {
                Ok(ReadStep::WouldBlock) => return,
                Ok(ReadStep::Progress(None)) => {}
                Ok(ReadStep::Progress(Some(frame))) => {
                    self.on_frame(arena, idx, frame);
                    if self.peers[idx].is_none() {
                        return;
                    }
                }
                Err(e) => return self.fail(arena, idx, e),
            }
        }
    }

    fn on_frame(&mut self, arena: &mut Arena, idx: usize, frame: Frame) {
        let p = self.peers[idx].as_mut().expect("live peer");
        match frame {
            Frame::Hello(hello) => self.on_hello(arena, idx, hello),
            Frame::Auth(proof) => self.on_auth(arena, idx, &proof),
            Frame::Status(nonce) => self.on_status(arena, idx, nonce),
            Frame::Push { key, clock } => {
                let rank = p.rank.expect("pushes only after the handshake");
                // The payload was only read into the slot while it was lent (read_step), so the
                // hand-over cannot find it held.
                arena
                    .hand_over(rank, key, clock)
                    .expect("received into a lent slot");
                self.pending.push(Event::Pushed { rank, key, clock });
            }
            Frame::Bye => self.close(arena, idx, Some(LeaveReason::Bye)),
            Frame::Error(message) => {
                let e = PeerError::Remote {
                    peer: p.addr.clone(),
                    message,
                };
                self.close(arena, idx, Some(LeaveReason::Failed(e)));
            }
            Frame::RdmaConnect(payload) => {
                let rank = p.rank.expect("checked at the header");
                if !p.join_pending {
                    let e = p.proto_err(ProtocolError::Unexpected {
                        kind: FrameKind::RdmaConnect,
                        when: "without an RDMA offer announced in the hello",
                    });
                    return self.fail(arena, idx, e);
                }
                self.offers.push((rank, payload));
            }
        }
    }

    /// Writes what peer `idx` has queued and keeps its interest in writability up to date.
    fn flush(&mut self, arena: &mut Arena, idx: usize) {
        let p = self.peers[idx].as_mut().expect("live peer");
        let before = p.out.queued();
        let done = match p.out.flush(&mut p.stream, arena) {
            Ok(done) => done,
            Err(e) => {
                let e = p.io_err("write", e);
                return self.fail(arena, idx, e);
            }
        };
        // The write deadline runs from the last progress while something is left.
        let was_stalled = p.stalled_since.is_some();
        if done {
            p.stalled_since = None;
        } else if !was_stalled || p.out.queued() < before {
            p.stalled_since = Some(Instant::now());
        }
        match (was_stalled, p.stalled_since.is_some()) {
            (false, true) => self.stalled += 1,
            (true, false) => self.stalled -= 1,
            _ => {}
        }
        if done && p.close_when_sent {
            let _ = p.stream.shutdown(Shutdown::Write);
            return self.close(arena, idx, None);
        }
        if done == p.want_write {
            if let Err(e) = self.reactor.modify(p.stream.as_fd(), p.token, !done) {
                let e = p.io_err("epoll_ctl(MOD)", e.into());
                return self.fail(arena, idx, e);
            }
            p.want_write = !done;
        }
    }

    /// Tells the peer why (best effort: one non-blocking write) and closes.
    fn send_error_and_close(
        &mut self,
        arena: &mut Arena,
        idx: usize,
        why: &str,
        reason: Option<LeaveReason>,
    ) {
        if let Some(p) = self.peers[idx].as_mut() {
            let frame = crate::protocol::control_frame(FrameKind::Error, 0, 0, why.as_bytes());
            if p.out.is_empty() {
                let _ = p.stream.write(&frame);
            }
            let _ = p.stream.shutdown(Shutdown::Write);
        }
        self.close(arena, idx, reason);
    }

    /// Refuses a handshake.
    fn refuse(&mut self, arena: &mut Arena, idx: usize, why: &str) {
        let peer = self.peers[idx].as_ref().expect("live peer").addr.clone();
        self.pending.push(Event::Refused {
            peer,
            reason: why.to_string(),
        });
        self.send_error_and_close(arena, idx, why, None);
    }

    /// Drops a peer that failed.
    fn fail(&mut self, arena: &mut Arena, idx: usize, e: PeerError) {
        let p = self.peers[idx].as_ref().expect("live peer");
        let why = e.to_string();
        if p.rank.is_none() {
            let peer = p.addr.clone();
            self.pending.push(Event::Refused {
                peer,
                reason: why.clone(),
            });
            return self.send_error_and_close(arena, idx, &why, None);
        }
        self.send_error_and_close(arena, idx, &why, Some(LeaveReason::Failed(e)));
    }

    /// Closes peer `idx`. Its queued sends stop reading the arena, and its slots are lent again
    /// before anyone else may take its rank (the server sums only slots it holds, so a round
    /// that still counts this worker simply goes without it).
    fn close(&mut self, arena: &mut Arena, idx: usize, reason: Option<LeaveReason>) {
        let Some(mut p) = self.peers[idx].take() else {
            return;
        };
        self.reactor.delete(&p.stream);
        p.out.abandon(arena);
        self.free.push(idx);
        self.admission.remove(idx);
        if p.stalled_since.is_some() {
            self.stalled -= 1;
        }
        if let Some(rank) = p.rank {
            arena.reset_worker(rank);
            self.by_rank[rank as usize] = None;
            // A peer whose join was still pending never joined: nothing to report it left.
            if p.join_pending {
                self.abandoned.push(rank);
            } else {
                self.pending.push(Event::Left {
                    rank,
                    reason: reason.unwrap_or(LeaveReason::Dropped("closed".into())),
                });
            }
        }
    }
}
