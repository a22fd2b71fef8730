//! The server side of the TCP transport: one thread, one level-triggered epoll set, non-blocking
//! sockets, and a timerfd for sub-millisecond policy deadlines.
//!
//! Every connection is a small state machine (header, then payload). A push payload is read
//! straight into that worker's slot of the [`SlotRegion`]; a model goes out by `writev` of the
//! header and the region's own model bytes. What the kernel does not take at once stays queued as
//! a reference into the region, and is copied only if the model is about to change under it
//! ([`Transport::region_mut`]). A slow peer therefore costs at most one model of memory, never
//! time for the others; a broken or malformed peer is dropped alone.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use socket2::{Domain, Protocol, Socket, Type};

use crate::protocol::{self, FrameKind, Header, Hello, Limits, ProtocolError, HEADER_LEN};
use crate::{
    Event, LeaveReason, PeerError, Rank, RegionLayout, SlotRegion, Transport, TransportError,
};

const LISTENER: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;
const WATCH: u64 = u64::MAX - 2;
/// Reads per readiness event before moving on to other peers (level-triggered: the rest waits).
const READS_PER_WAKEUP: usize = 16;
/// Connections allowed beyond one per worker (handshakes in flight, reconnects).
const SPARE_CONNECTIONS: usize = 64;

/// What the server transport needs to know about the job.
#[derive(Debug, Clone)]
pub struct TcpServerConfig {
    /// Address to listen on; port 0 picks a free port (see [`TcpServer::local_addr`]).
    pub listen: SocketAddr,
    /// Number of workers; ranks are `0..workers`.
    pub workers: usize,
    /// Elements (f32) of each key's tensor.
    pub dims: Vec<usize>,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    token: u64,
    peer: String,
    rank: Option<Rank>,
    /// Header bytes, or payload bytes of `frame`, received so far.
    got: usize,
    hdr: [u8; HEADER_LEN],
    /// The frame whose payload is being received.
    frame: Option<Header>,
    /// Payload of a control frame (hello, error).
    ctrl: Vec<u8>,
    /// What the kernel has not taken yet, in order.
    out: VecDeque<Segment>,
    /// EPOLLOUT is in the interest set.
    want_write: bool,
    /// A push was accepted and its reply not sent: the slot is the server's, another push is a
    /// protocol violation.
    slot_busy: bool,
    /// The hello announced an RDMA offer: the join is reported once the offer is answered.
    join_pending: bool,
}

impl Conn {
    fn flags(want_write: bool) -> EpollFlags {
        let base = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        if want_write {
            base | EpollFlags::EPOLLOUT
        } else {
            base
        }
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> PeerError {
        PeerError::Io {
            op,
            peer: self.peer.clone(),
            source,
        }
    }

    fn proto_err(&self, source: ProtocolError) -> PeerError {
        PeerError::Protocol {
            peer: self.peer.clone(),
            source,
        }
    }

    /// Writes what is queued, several segments per `writev`; returns whether all went out.
    fn flush(&mut self, region: &SlotRegion) -> Result<bool, PeerError> {
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 4];
            let mut n = 0;
            for seg in self.out.iter().take(slices.len()) {
                slices[n] = IoSlice::new(seg.remaining(region));
                n += 1;
            }
            match self.stream.write_vectored(&slices[..n]) {
                Ok(0) => return Err(self.io_err("write", io::ErrorKind::WriteZero.into())),
                Ok(mut written) => {
                    while written > 0 {
                        let seg = self.out.front_mut().expect("wrote from it");
                        let left = seg.remaining(region).len();
                        if written < left {
                            seg.advance(written);
                            break;
                        }
                        written -= left;
                        self.out.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("write", e)),
            }
        }
        Ok(true)
    }

    /// Queues `segs` and writes as much as the kernel takes now.
    fn send(&mut self, region: &SlotRegion, segs: [Segment; 2]) -> Result<(), PeerError> {
        self.out
            .extend(segs.into_iter().filter(|s| !s.remaining(region).is_empty()));
        self.flush(region).map(drop)
    }

    /// Copies the unsent part of every queued model into the queue itself: called before the
    /// model changes, so a slow peer still gets the version it was sent, whole.
    fn detach_models(&mut self, region: &SlotRegion) {
        for seg in self.out.iter_mut() {
            if let Segment::Model { .. } = seg {
                let bytes = seg.remaining(region).to_vec();
                *seg = Segment::Bytes { buf: bytes, pos: 0 };
            }
        }
    }
}

/// A piece of a connection's output queue.
#[derive(Debug)]
enum Segment {
    /// Owned bytes (headers, control frames, detached models), sent from `pos` on.
    Bytes { buf: Vec<u8>, pos: usize },
    /// A model still in the region, sent from `pos` on: no copy while the model is unchanged.
    Model { key: u32, pos: usize },
}

impl Segment {
    fn header(h: &Header) -> Self {
        Segment::Bytes {
            buf: h.encode().to_vec(),
            pos: 0,
        }
    }

    fn remaining<'a>(&'a self, region: &'a SlotRegion) -> &'a [u8] {
        match self {
            Segment::Bytes { buf, pos } => &buf[*pos..],
            Segment::Model { key, pos } => &region.model_bytes(*key as usize)[*pos..],
        }
    }

    fn empty() -> Self {
        Segment::Bytes {
            buf: Vec::new(),
            pos: 0,
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Segment::Bytes { pos, .. } | Segment::Model { pos, .. } => *pos += n,
        }
    }
}

/// One step of reading a connection.
enum ReadStep {
    /// The socket has nothing more right now.
    WouldBlock,
    /// Some bytes arrived; the frame is not complete.
    Progress,
    /// A whole frame (header and payload) arrived.
    Frame(Header),
}

/// The epoll TCP transport, server side.
#[derive(Debug)]
pub struct TcpServer {
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    listener: TcpListener,
    local: SocketAddr,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    next_gen: u64,
    by_rank: Vec<Option<usize>>,
    region: SlotRegion,
    limits: Limits,
    workers: usize,
    /// Events produced outside `poll` (failed sends, disconnects), delivered by the next poll.
    pending: Vec<Event>,
    ready: Vec<EpollEvent>,
    /// RDMA connection requests (rank, payload) for the RDMA transport on top.
    rdma_requests: Vec<(Rank, Vec<u8>)>,
    /// An extra fd watched by the same epoll set (the RDMA completion channel) became readable.
    watch_ready: bool,
    /// An RDMA transport on top answers RDMA offers; without one they are declined here.
    rdma_enabled: bool,
}

impl TcpServer {
    /// Maps the slot region and starts listening.
    pub fn bind(cfg: &TcpServerConfig) -> Result<Self, TransportError> {
        let layout = RegionLayout::new(cfg.workers, &cfg.dims)
            .map_err(|e| TransportError::os("laying out the slot region", e))?;
        let region = SlotRegion::new(layout)
            .map_err(|e| TransportError::os("mapping the slot region", e))?;
        let listener = listen(cfg.listen)?;
        let local = listener
            .local_addr()
            .map_err(|e| TransportError::os("getsockname", e))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| TransportError::os("epoll_create1", e))?;
        epoll
            .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
            .map_err(|e| TransportError::os("epoll_ctl(ADD listener)", e))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| TransportError::os("timerfd_create", e))?;
        epoll
            .add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))
            .map_err(|e| TransportError::os("epoll_ctl(ADD timerfd)", e))?;
        Ok(Self {
            epoll,
            timer,
            timer_armed: false,
            listener,
            local,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 0,
            by_rank: vec![None; cfg.workers],
            region,
            limits: Limits {
                dims: cfg.dims.clone(),
            },
            workers: cfg.workers,
            pending: Vec::new(),
            ready: vec![EpollEvent::empty(); 256],
            rdma_requests: Vec::new(),
            watch_ready: false,
            rdma_enabled: false,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Adds `fd` to the event loop: [`poll`](Transport::poll) returns when it is readable and
    /// [`take_watch_ready`](Self::take_watch_ready) says so. For the RDMA completion channel.
    pub fn watch(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), TransportError> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, WATCH))
            .map_err(|e| TransportError::os("epoll_ctl(ADD completion channel)", e))
    }

    /// Whether the watched fd became readable since the last call.
    pub fn take_watch_ready(&mut self) -> bool {
        std::mem::take(&mut self.watch_ready)
    }

    /// Hands RDMA offers to the caller ([`take_rdma_requests`](Self::take_rdma_requests))
    /// instead of declining them.
    pub fn enable_rdma_requests(&mut self) {
        self.rdma_enabled = true;
    }

    /// RDMA connection requests received since the last call: (rank, payload).
    pub fn take_rdma_requests(&mut self) -> Vec<(Rank, Vec<u8>)> {
        std::mem::take(&mut self.rdma_requests)
    }

    /// Answers worker `rank`'s RDMA offer with "no" (it carries on over TCP) and reports it as
    /// joined.
    pub fn decline_rdma(&mut self, rank: Rank) {
        self.send_control(rank, FrameKind::RdmaConnect, &[]);
        self.complete_join(rank);
    }

    /// Reports worker `rank`, whose RDMA offer has been answered, as joined.
    pub fn complete_join(&mut self, rank: Rank) {
        let Some(idx) = self.by_rank.get(rank as usize).copied().flatten() else {
            return;
        };
        let conn = self.conns[idx].as_mut().expect("live connection");
        if std::mem::take(&mut conn.join_pending) {
            self.pending.push(Event::Joined { rank });
        }
    }

    /// Sends worker `rank` a control frame. A peer that is gone is ignored.
    pub fn send_control(&mut self, rank: Rank, kind: FrameKind, payload: &[u8]) {
        let Some(idx) = self.by_rank.get(rank as usize).copied().flatten() else {
            return;
        };
        let conn = self.conns[idx].as_mut().expect("live connection");
        let segs = [
            Segment::Bytes {
                buf: protocol::control_frame(kind, 0, 0, payload),
                pos: 0,
            },
            Segment::empty(),
        ];
        match conn.send(&self.region, segs) {
            Ok(()) => self.update_interest(idx),
            Err(e) => self.fail(idx, e),
        }
    }

    /// Ranks currently connected.
    pub fn connected(&self) -> usize {
        self.by_rank.iter().filter(|c| c.is_some()).count()
    }

    fn arm_timer(&mut self, timeout: Option<Duration>) -> Result<(), TransportError> {
        match timeout {
            Some(d) if !d.is_zero() => {
                self.timer
                    .set(
                        Expiration::OneShot(TimeSpec::from_duration(d)),
                        TimerSetTimeFlags::empty(),
                    )
                    .map_err(|e| TransportError::os("timerfd_settime", e))?;
                self.timer_armed = true;
            }
            _ if self.timer_armed => {
                self.timer
                    .unset()
                    .map_err(|e| TransportError::os("timerfd_settime", e))?;
                self.timer_armed = false;
            }
            _ => {}
        }
        Ok(())
    }

    fn accept_all(&mut self) {
        loop {
            let (stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECONNABORTED, EMFILE...: that one connection is lost; keep serving.
                Err(e) => {
                    self.pending.push(Event::Refused {
                        peer: "(unknown)".into(),
                        reason: format!("accept failed: {e}"),
                    });
                    return;
                }
            };
            let peer = addr.to_string();
            let live = self.conns.len() - self.free.len();
            if live >= self.workers + SPARE_CONNECTIONS {
                self.pending.push(Event::Refused {
                    peer,
                    reason: format!("too many connections ({live})"),
                });
                continue;
            }
            if let Err(e) = stream
                .set_nonblocking(true)
                .and_then(|_| stream.set_nodelay(true))
            {
                self.pending.push(Event::Refused {
                    peer,
                    reason: format!("socket setup failed: {e}"),
                });
                continue;
            }
            let idx = self.free.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            self.next_gen += 1;
            let token = (self.next_gen << 32) | idx as u64;
            if let Err(e) = self
                .epoll
                .add(&stream, EpollEvent::new(Conn::flags(false), token))
            {
                self.free.push(idx);
                self.pending.push(Event::Refused {
                    peer,
                    reason: format!("epoll_ctl(ADD) failed: {e}"),
                });
                continue;
            }
            self.conns[idx] = Some(Conn {
                stream,
                token,
                peer,
                rank: None,
                got: 0,
                hdr: [0; HEADER_LEN],
                frame: None,
                ctrl: Vec::new(),
                out: VecDeque::new(),
                want_write: false,
                slot_busy: false,
                join_pending: false,
            });
        }
    }

    /// Reads one chunk from connection `idx`.
    fn read_step(&mut self, idx: usize) -> Result<ReadStep, PeerError> {
        let conn = self.conns[idx].as_mut().expect("live connection");
        let Some(h) = conn.frame else {
            let Some(n) = read_nonblocking(&mut conn.stream, &mut conn.hdr[conn.got..])
                .map_err(|e| conn.io_err("read", e))?
            else {
                return Ok(ReadStep::WouldBlock);
            };
            if n == 0 {
                return Err(PeerError::Closed {
                    peer: conn.peer.clone(),
                    when: if conn.got == 0 {
                        "without saying goodbye"
                    } else {
                        "in the middle of a frame header"
                    },
                });
            }
            conn.got += n;
            if conn.got < HEADER_LEN {
                return Ok(ReadStep::Progress);
            }
            conn.got = 0;
            let h = Header::decode(&conn.hdr).map_err(|e| conn.proto_err(e))?;
            self.limits.check(&h).map_err(|e| conn.proto_err(e))?;
            let when = match (conn.rank, h.kind) {
                (None, FrameKind::Hello) => None,
                (None, _) => Some("before the handshake"),
                (Some(_), FrameKind::Hello) => Some("after the handshake"),
                (Some(_), FrameKind::Welcome | FrameKind::Model) => Some("from a worker"),
                (Some(_), FrameKind::Push) if conn.slot_busy => {
                    Some("while the previous push is still being aggregated (wait for the model)")
                }
                (Some(_), FrameKind::Push) => {
                    conn.slot_busy = true;
                    None
                }
                (Some(_), FrameKind::Bye | FrameKind::Error | FrameKind::RdmaConnect) => None,
            };
            if let Some(when) = when {
                return Err(conn.proto_err(ProtocolError::Unexpected { kind: h.kind, when }));
            }
            if h.len == 0 {
                return Ok(ReadStep::Frame(h));
            }
            if h.kind != FrameKind::Push {
                conn.ctrl.clear();
                conn.ctrl.resize(h.len as usize, 0);
            }
            conn.frame = Some(h);
            return Ok(ReadStep::Progress);
        };
        // The payload: a push goes straight into the worker's slot, anything else to `ctrl`.
        let dst = match (h.kind, conn.rank) {
            (FrameKind::Push, Some(rank)) => {
                &mut self.region.slot_bytes_mut(rank as usize, h.key as usize)[conn.got..]
            }
            _ => &mut conn.ctrl[conn.got..],
        };
        let Some(n) =
            read_nonblocking(&mut conn.stream, dst).map_err(|e| conn.io_err("read", e))?
        else {
            return Ok(ReadStep::WouldBlock);
        };
        if n == 0 {
            return Err(PeerError::Closed {
                peer: conn.peer.clone(),
                when: "in the middle of a frame payload",
            });
        }
        conn.got += n;
        if (conn.got as u64) < h.len {
            return Ok(ReadStep::Progress);
        }
        conn.got = 0;
        conn.frame = None;
        Ok(ReadStep::Frame(h))
    }

    fn on_readable(&mut self, idx: usize) {
        for _ in 0..READS_PER_WAKEUP {
            match self.read_step(idx) {
                Ok(ReadStep::WouldBlock) => return,
                Ok(ReadStep::Progress) => {}
                Ok(ReadStep::Frame(h)) => {
                    self.on_frame(idx, h);
                    if self.conns[idx].is_none() {
                        return;
                    }
                }
                Err(e) => return self.fail(idx, e),
            }
        }
    }

    fn on_frame(&mut self, idx: usize, h: Header) {
        let conn = self.conns[idx].as_mut().expect("live connection");
        match h.kind {
            FrameKind::Hello => {
                let hello = match Hello::decode(&conn.ctrl) {
                    Ok(hello) => hello,
                    Err(e) => {
                        let e = conn.proto_err(e);
                        return self.fail(idx, e);
                    }
                };
                if let Err(why) = self.admit(&hello) {
                    return self.refuse(idx, &why);
                }
                let conn = self.conns[idx].as_mut().expect("live connection");
                conn.rank = Some(hello.rank);
                conn.ctrl = Vec::new();
                self.by_rank[hello.rank as usize] = Some(idx);
                let welcome = Segment::header(&Header::new(FrameKind::Welcome, 0, 0, 0));
                if let Err(e) = conn.send(&self.region, [welcome, Segment::empty()]) {
                    return self.fail(idx, e);
                }
                self.update_interest(idx);
                if hello.rdma {
                    self.conns[idx]
                        .as_mut()
                        .expect("live connection")
                        .join_pending = true;
                } else {
                    self.pending.push(Event::Joined { rank: hello.rank });
                }
            }
            FrameKind::Push => {
                let rank = conn.rank.expect("checked at the header");
                self.pending.push(Event::Pushed {
                    rank,
                    key: h.key,
                    clock: h.clock,
                });
            }
            FrameKind::Bye => self.close(idx, Some(LeaveReason::Bye)),
            FrameKind::Error => {
                let e = PeerError::Remote {
                    peer: conn.peer.clone(),
                    message: String::from_utf8_lossy(&conn.ctrl).into_owned(),
                };
                self.close(idx, Some(LeaveReason::Failed(e)));
            }
            FrameKind::RdmaConnect => {
                let rank = conn.rank.expect("checked at the header");
                if !conn.join_pending {
                    let e = conn.proto_err(ProtocolError::Unexpected {
                        kind: h.kind,
                        when: "without an RDMA offer announced in the hello",
                    });
                    return self.fail(idx, e);
                }
                let payload = std::mem::take(&mut conn.ctrl);
                if self.rdma_enabled {
                    self.rdma_requests.push((rank, payload));
                } else {
                    self.decline_rdma(rank);
                }
            }
            FrameKind::Welcome | FrameKind::Model => unreachable!("rejected at the header"),
        }
    }

    /// Whether a hello describes this job and its rank is free.
    fn admit(&self, hello: &Hello) -> Result<(), String> {
        if hello.rank as usize >= self.workers {
            return Err(format!(
                "rank {} is out of range: the job has {} workers (ranks 0..{})",
                hello.rank,
                self.workers,
                self.workers - 1
            ));
        }
        if hello.workers != 0 && hello.workers as usize != self.workers {
            return Err(format!(
                "job size mismatch: the worker expects {} workers, the server has {} (pass the same --workers to both)",
                hello.workers, self.workers
            ));
        }
        let dims: Vec<u64> = self.limits.dims.iter().map(|&d| d as u64).collect();
        if hello.dims != dims {
            return Err(format!(
                "tensor size mismatch: the worker has {:?}, the server {:?} (pass the same --dim to both)",
                hello.dims, dims
            ));
        }
        if let Some(other) = self.by_rank[hello.rank as usize] {
            let other = &self.conns[other].as_ref().expect("live connection").peer;
            return Err(format!(
                "rank {} is already connected from {other} (each worker needs its own --rank)",
                hello.rank
            ));
        }
        Ok(())
    }

    fn update_interest(&mut self, idx: usize) {
        let Some(conn) = self.conns[idx].as_mut() else {
            return;
        };
        let want = !conn.out.is_empty();
        if want != conn.want_write {
            let mut ev = EpollEvent::new(Conn::flags(want), conn.token);
            if let Err(e) = self.epoll.modify(&conn.stream, &mut ev) {
                let e = conn.io_err("epoll_ctl(MOD)", e.into());
                return self.fail(idx, e);
            }
            conn.want_write = want;
        }
    }

    fn on_writable(&mut self, idx: usize) {
        let conn = self.conns[idx].as_mut().expect("live connection");
        match conn.flush(&self.region) {
            Ok(_) => self.update_interest(idx),
            Err(e) => self.fail(idx, e),
        }
    }

    /// Tells the peer why (best effort: one non-blocking write) and closes.
    fn send_error_and_close(&mut self, idx: usize, why: &str, reason: Option<LeaveReason>) {
        if let Some(conn) = self.conns[idx].as_mut() {
            let frame = protocol::control_frame(FrameKind::Error, 0, 0, why.as_bytes());
            if conn.out.is_empty() {
                let _ = conn.stream.write(&frame);
            }
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        self.close(idx, reason);
    }

    /// Refuses a handshake.
    fn refuse(&mut self, idx: usize, why: &str) {
        let peer = self.conns[idx]
            .as_ref()
            .expect("live connection")
            .peer
            .clone();
        self.pending.push(Event::Refused {
            peer,
            reason: why.to_string(),
        });
        self.send_error_and_close(idx, why, None);
    }

    /// Drops a peer that failed.
    fn fail(&mut self, idx: usize, e: PeerError) {
        let conn = self.conns[idx].as_ref().expect("live connection");
        if conn.rank.is_none() {
            let peer = conn.peer.clone();
            self.pending.push(Event::Refused {
                peer,
                reason: e.to_string(),
            });
            return self.send_error_and_close(idx, &e.to_string(), None);
        }
        let why = e.to_string();
        self.send_error_and_close(idx, &why, Some(LeaveReason::Failed(e)));
    }

    fn close(&mut self, idx: usize, reason: Option<LeaveReason>) {
        let Some(conn) = self.conns[idx].take() else {
            return;
        };
        let _ = self.epoll.delete(&conn.stream);
        self.free.push(idx);
        if let Some(rank) = conn.rank {
            self.by_rank[rank as usize] = None;
            self.pending.push(Event::Left {
                rank,
                reason: reason.unwrap_or(LeaveReason::Dropped("closed".into())),
            });
        }
    }
}

impl Transport for TcpServer {
    fn region(&self) -> &SlotRegion {
        &self.region
    }

    fn region_mut(&mut self) -> &mut SlotRegion {
        // The caller may change a model: models still queued for slow peers are copied first.
        for conn in self.conns.iter_mut().flatten() {
            conn.detach_models(&self.region);
        }
        &mut self.region
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let timeout = crate::wait_for(&self.pending, timeout);
        self.arm_timer(timeout)?;
        let wait = match timeout {
            Some(d) if d.is_zero() => EpollTimeout::ZERO,
            _ => EpollTimeout::NONE,
        };
        let n = match self.epoll.wait(&mut self.ready, wait) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(TransportError::os("epoll_wait", e)),
        };
        for i in 0..n {
            let (flags, token) = (self.ready[i].events(), self.ready[i].data());
            match token {
                LISTENER => self.accept_all(),
                WATCH => self.watch_ready = true,
                TIMER => {
                    // Drain the expiration count; EAGAIN just means it was already drained.
                    let _ = self.timer.wait();
                    self.timer_armed = false;
                }
                _ => {
                    let idx = (token & 0xffff_ffff) as usize;
                    let live = |s: &Self| {
                        s.conns
                            .get(idx)
                            .and_then(Option::as_ref)
                            .is_some_and(|c| c.token == token)
                    };
                    if live(self) && flags.intersects(!EpollFlags::EPOLLOUT) {
                        self.on_readable(idx);
                    }
                    if live(self) && flags.contains(EpollFlags::EPOLLOUT) {
                        self.on_writable(idx);
                    }
                }
            }
        }
        events.append(&mut self.pending);
        Ok(())
    }

    fn send_model(&mut self, rank: Rank, key: u32, round: u64) {
        let Some(idx) = self.by_rank.get(rank as usize).copied().flatten() else {
            return;
        };
        let conn = self.conns[idx].as_mut().expect("live connection");
        conn.slot_busy = false;
        let len = self.region.model_bytes(key as usize).len() as u64;
        let hdr = Segment::header(&Header::new(FrameKind::Model, key, round, len));
        match conn.send(&self.region, [hdr, Segment::Model { key, pos: 0 }]) {
            Ok(()) => self.update_interest(idx),
            Err(e) => self.fail(idx, e),
        }
    }

    fn disconnect(&mut self, rank: Rank, why: &str) {
        if let Some(idx) = self.by_rank.get(rank as usize).copied().flatten() {
            self.send_error_and_close(idx, why, Some(LeaveReason::Dropped(why.to_string())));
        }
    }

    fn shutdown(&mut self, grace: Duration) {
        // Lingering close: say goodbye, then keep reading (and discarding) until each worker has
        // closed its end, so a worker in the middle of a push sees our goodbye, not EPIPE.
        let bye = Header::new(FrameKind::Bye, 0, 0, 0);
        for idx in 0..self.conns.len() {
            if let Some(conn) = self.conns[idx].as_mut() {
                let segs = [Segment::header(&bye), Segment::empty()];
                if conn.rank.is_none() || conn.send(&self.region, segs).is_err() {
                    self.close(idx, None);
                }
            }
        }
        let deadline = Instant::now() + grace;
        let mut scratch = vec![0u8; 256 * 1024];
        loop {
            for idx in 0..self.conns.len() {
                let Some(conn) = self.conns[idx].as_mut() else {
                    continue;
                };
                let mut gone = conn.flush(&self.region).is_err();
                while !gone {
                    match conn.stream.read(&mut scratch) {
                        Ok(0) => gone = true,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => gone = true,
                    }
                }
                if gone {
                    self.close(idx, None);
                }
            }
            let now = Instant::now();
            if self.conns.iter().all(Option::is_none) || now >= deadline {
                break;
            }
            // Level-triggered: any peer with data or a pending write wakes us up.
            for idx in 0..self.conns.len() {
                self.update_interest(idx);
            }
            let wait = EpollTimeout::try_from((deadline - now).min(Duration::from_millis(50)))
                .unwrap_or(EpollTimeout::ZERO);
            let _ = self.epoll.wait(&mut self.ready, wait);
        }
        for idx in 0..self.conns.len() {
            self.close(idx, None);
        }
        self.pending.clear();
    }
}

/// One `read`, retried on EINTR: `None` when the socket has nothing now, `Some(0)` at EOF.
fn read_nonblocking(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn listen(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    let err = |source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc_errno) if libc_errno == Errno::EADDRINUSE as i32 => {
                " (another process holds this port: pick another with --listen HOST:PORT, or port 0 for any free one)"
            }
            Some(libc_errno) if libc_errno == Errno::EADDRNOTAVAIL as i32 => {
                " (no interface of this host has that address)"
            }
            Some(libc_errno) if libc_errno == Errno::EACCES as i32 => {
                " (ports below 1024 need privileges: use a higher port)"
            }
            _ => "",
        };
        TransportError::Listen {
            addr: addr.to_string(),
            source,
            hint,
        }
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_cloexec(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}
