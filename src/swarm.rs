//! Many simulated worker connections driven by one thread, for scale benchmarks
//! (`hetsync bench scale`).
//!
//! A thread per worker would cost a stack and a scheduler slot each, so a thousand workers would
//! measure the machine rather than the server. Here every connection is handshaken with the
//! blocking [`WorkerEnd::connect`], then switched to non-blocking and driven from one
//! level-triggered epoll set: each pushes every part of every tensor (header and payload from one
//! shared gradient buffer, partial writes resumed where they stopped) and reads the models back
//! (header, then the payload into one shared scratch buffer, partial reads resumed), round after
//! round. Nothing is computed: the bench measures the server and the wire, not the workers.
//!
//! Pushes follow the protocol as [`hetsync_transport::tcp::TcpClient`] and [`crate::client`] do:
//! a part is pushed again only once its model came back, stamped with the round of the last model
//! of that part (barrier policies) or the worker's clock on the key (vector clocks), as the
//! welcome says ([`PushClock`]).

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hetsync_transport::channel::reactor::interest;
use hetsync_transport::channel::WorkerEnd;
use hetsync_transport::protocol::{
    self, FrameKind, Header, Hello, Parts, PushClock, HEADER_LEN, MAX_CONTROL_PAYLOAD,
};
use hetsync_transport::LinkError;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::Clock;

/// Reads per readiness event of one connection before the others get their turn
/// (level-triggered: what is left wakes the next wait).
const READS_PER_WAKEUP: usize = 16;
/// The value of every gradient element: small, so the model stays finite round after round.
const GRADIENT: f32 = 1e-3;

/// A failure of the swarm, naming the connection (1-based, as the progress counts them).
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// A connection could not be made or was refused at the handshake.
    #[error("connection {index} of {of}: {source}")]
    Connect {
        /// Which connection (1-based).
        index: usize,
        /// How many were asked for.
        of: usize,
        /// Why.
        #[source]
        source: LinkError,
    },
    /// A connection was not made before the connect deadline.
    #[error("connection {index} of {of}: not connected within the connect deadline of {secs:.1} s ({done} connected)")]
    ConnectDeadline {
        /// Which connection (1-based).
        index: usize,
        /// How many were asked for.
        of: usize,
        /// The deadline.
        secs: f64,
        /// How many were connected by then.
        done: usize,
    },
    /// A connection failed after its handshake.
    #[error("connection {index} of {of}: {what}")]
    Conn {
        /// Which connection (1-based).
        index: usize,
        /// How many there are.
        of: usize,
        /// What happened.
        what: String,
    },
    /// The wait for readiness itself failed.
    #[error("{op}: {source}")]
    Os {
        /// The call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Nothing came back for too long.
    #[error("{0}")]
    Stalled(String),
}

fn os(op: &'static str) -> impl FnOnce(Errno) -> SwarmError {
    move |e| SwarmError::Os {
        op,
        source: e.into(),
    }
}

/// What the payload being read belongs to.
#[derive(Debug, Clone, Copy)]
enum Reading {
    /// A frame header (its bytes so far in `hdr`).
    Header,
    /// The model of part `key` at round `round`: `left` bytes still to come.
    Model { key: u32, round: Clock, left: usize },
    /// An error frame's text: `left` bytes still to come.
    Error { left: usize },
}

/// One worker connection.
#[derive(Debug)]
struct Conn {
    end: WorkerEnd,
    /// The round of the last model of each part (the stamp of its next push under a barrier).
    rounds: Vec<Clock>,
    /// Parts whose model has not come back yet in this iteration.
    awaited: usize,
    /// The part being pushed; `parts.len()` once the iteration's pushes are all out.
    next: usize,
    /// Bytes of the current push frame (header, then payload) written so far.
    sent: usize,
    /// The current push's header.
    out_hdr: [u8; HEADER_LEN],
    /// EPOLLOUT is in the interest set.
    want_write: bool,
    reading: Reading,
    hdr: [u8; HEADER_LEN],
    hdr_got: usize,
    /// An error frame's text so far.
    error_text: Vec<u8>,
    /// Iterations completed: every part pushed and its model back.
    iterations: u64,
}

/// Connection `i`'s failure, as an error.
fn fail(i: usize, of: usize, what: impl Into<String>) -> SwarmError {
    SwarmError::Conn {
        index: i + 1,
        of,
        what: what.into(),
    }
}

/// Many worker connections to one server, driven from one thread (see the module doc).
#[derive(Debug)]
pub struct Swarm {
    epoll: Epoll,
    conns: Vec<Conn>,
    parts: Parts,
    push_clock: PushClock,
    /// Every push's payload: the first bytes of it, as long as the largest part.
    grad: Vec<u8>,
    /// Where every model's payload is read to (and dropped).
    scratch: Vec<u8>,
    events: Vec<EpollEvent>,
    /// Start the next iteration when one completes.
    running: bool,
    /// When a model last came in.
    last_model: Instant,
}

impl Swarm {
    /// Connects `n` workers (ranks `0..n`) with tensors of `dims` floats to the server at `addr`,
    /// one after the other, all within `wait` (retrying while the server is not listening yet).
    /// `progress` is called with the number connected after each connection.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn connect(
        addr: &str,
        n: usize,
        dims: &[usize],
        wait: Duration,
        mut progress: impl FnMut(usize),
    ) -> Result<Self, SwarmError> {
        assert!(n > 0, "a swarm needs at least one connection");
        let deadline = Instant::now() + wait;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(os("epoll_create1"))?;
        let mut conns = Vec::with_capacity(n);
        let mut layout: Option<(Parts, PushClock)> = None;
        for i in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SwarmError::ConnectDeadline {
                    index: i + 1,
                    of: n,
                    secs: wait.as_secs_f64(),
                    done: i,
                });
            }
            let hello = Hello {
                rank: i as u32,
                workers: n as u32,
                dims: dims.iter().map(|&d| d as u64).collect(),
                rdma: false,
                auth_nonce: None,
            };
            let end = WorkerEnd::connect(addr, &hello, left, None).map_err(|source| {
                SwarmError::Connect {
                    index: i + 1,
                    of: n,
                    source,
                }
            })?;
            let (parts, _) = layout.get_or_insert_with(|| (end.parts().clone(), end.push_clock()));
            let stream = end.stream();
            stream
                .set_nonblocking(true)
                .map_err(|e| fail(i, n, format!("setting the socket non-blocking: {e}")))?;
            epoll
                .add(stream, EpollEvent::new(interest(false), i as u64))
                .map_err(os("epoll_ctl(ADD)"))?;
            conns.push(Conn {
                rounds: vec![0; parts.len()],
                // The server sends every part's model once all have joined: the first read.
                awaited: parts.len(),
                next: parts.len(),
                sent: 0,
                out_hdr: [0; HEADER_LEN],
                want_write: false,
                reading: Reading::Header,
                hdr: [0; HEADER_LEN],
                hdr_got: 0,
                error_text: Vec::new(),
                iterations: 0,
                end,
            });
            progress(i + 1);
        }
        let (parts, push_clock) = layout.expect("at least one connection");
        let largest = parts.iter().map(|p| p.bytes()).max().unwrap_or(0);
        let grad = bytemuck::cast_slice::<f32, u8>(&vec![GRADIENT; largest / 4]).to_vec();
        Ok(Self {
            epoll,
            conns,
            scratch: vec![0; largest.max(MAX_CONTROL_PAYLOAD as usize)],
            grad,
            parts,
            push_clock,
            events: vec![EpollEvent::empty(); 1024],
            running: false,
            last_model: Instant::now(),
        })
    }

    /// Connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there is no connection.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The job's parts, as the server's welcome cut the tensors.
    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    /// Iterations (every part pushed and its model back) every connection has completed: the
    /// job's rounds (barrier) or clocks (vector clocks) all of them took part in.
    pub fn rounds(&self) -> u64 {
        self.conns.iter().map(|c| c.iterations).min().unwrap_or(0)
    }

    /// Connections still waiting for a model.
    pub fn waiting(&self) -> usize {
        self.conns.iter().filter(|c| c.awaited > 0).count()
    }

    /// Reads until every connection has every part's first model (sent once all have joined),
    /// or fails at `deadline`.
    pub fn wait_first_models(&mut self, deadline: Instant) -> Result<(), SwarmError> {
        self.last_model = Instant::now();
        while self.waiting() > 0 {
            if Instant::now() >= deadline {
                return Err(SwarmError::Stalled(format!(
                    "{} of {} connections still wait for their first model: the server did not start the job in time",
                    self.waiting(),
                    self.conns.len()
                )));
            }
            self.turn(deadline)?;
        }
        Ok(())
    }

    /// Starts every connection's pushes and keeps iterating until `until`; `tick` is called
    /// about every `every` with the swarm. Fails when no model arrives for `stall`.
    pub fn run(
        &mut self,
        until: Instant,
        every: Duration,
        stall: Duration,
        mut tick: impl FnMut(&Self),
    ) -> Result<(), SwarmError> {
        self.running = true;
        self.last_model = Instant::now();
        for i in 0..self.conns.len() {
            self.start_iteration(i)?;
        }
        let mut next_tick = Instant::now() + every;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            if now >= next_tick {
                tick(self);
                next_tick += every;
            }
            if now.saturating_duration_since(self.last_model) >= stall {
                return Err(SwarmError::Stalled(format!(
                    "no model came back for {:.1} s ({} of {} connections wait for one): the server is stuck or too slow",
                    stall.as_secs_f64(),
                    self.waiting(),
                    self.conns.len()
                )));
            }
            self.turn(until.min(next_tick))?;
        }
        self.running = false;
        Ok(())
    }

    /// One wait for readiness (until `deadline` at most) and the work it allows.
    fn turn(&mut self, deadline: Instant) -> Result<(), SwarmError> {
        let left = deadline.saturating_duration_since(Instant::now());
        // Rounded up, so a short wait still waits instead of spinning.
        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        let timeout = EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX);
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(os("epoll_wait")(e)),
        };
        for k in 0..n {
            let ev = self.events[k];
            let i = ev.data() as usize;
            let flags = ev.events();
            if flags.intersects(!EpollFlags::EPOLLOUT) {
                self.on_readable(i)?;
            }
            if flags.contains(EpollFlags::EPOLLOUT) {
                self.write(i)?;
            }
        }
        Ok(())
    }

    /// Begins connection `i`'s next iteration: every part's push, in key order.
    fn start_iteration(&mut self, i: usize) -> Result<(), SwarmError> {
        let c = &mut self.conns[i];
        c.awaited = self.parts.len();
        c.next = 0;
        c.sent = 0;
        self.stamp(i);
        self.write(i)
    }

    /// Encodes the header of connection `i`'s next push.
    fn stamp(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let key = c.next as u32;
        let clock = match self.push_clock {
            PushClock::ModelRound => c.rounds[c.next],
            // Every key is pushed once per iteration, so the key's clock is the iterations.
            PushClock::WorkerClock => c.iterations,
        };
        let len = self.parts[key].bytes() as u64;
        c.out_hdr = Header::new(FrameKind::Push, key, clock, len).encode();
    }

    /// Writes connection `i`'s pushes until done or the socket is full, and keeps its interest
    /// in writability up to date.
    fn write(&mut self, i: usize) -> Result<(), SwarmError> {
        let of = self.conns.len();
        while self.conns[i].next < self.parts.len() {
            let c = &mut self.conns[i];
            let body = &self.grad[..self.parts[c.next as u32].bytes()];
            let total = HEADER_LEN + body.len();
            let bufs = if c.sent < HEADER_LEN {
                [IoSlice::new(&c.out_hdr[c.sent..]), IoSlice::new(body)]
            } else {
                [
                    IoSlice::new(&body[c.sent - HEADER_LEN..]),
                    IoSlice::new(&[]),
                ]
            };
            let mut stream: &TcpStream = c.end.stream();
            match stream.write_vectored(&bufs) {
                Ok(0) => {
                    return Err(fail(
                        i,
                        of,
                        "the server stopped taking pushes (write returned 0)",
                    ))
                }
                Ok(n) => {
                    c.sent += n;
                    if c.sent == total {
                        c.sent = 0;
                        c.next += 1;
                        if c.next < self.parts.len() {
                            self.stamp(i);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.set_want_write(i, true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(fail(i, of, format!("writing a push: {e}"))),
            }
        }
        self.set_want_write(i, false)?;
        self.maybe_done(i)
    }

    fn set_want_write(&mut self, i: usize, want: bool) -> Result<(), SwarmError> {
        let c = &mut self.conns[i];
        if c.want_write != want {
            self.epoll
                .modify(
                    c.end.stream(),
                    &mut EpollEvent::new(interest(want), i as u64),
                )
                .map_err(os("epoll_ctl(MOD)"))?;
            c.want_write = want;
        }
        Ok(())
    }

    /// Ends connection `i`'s iteration once its pushes are out and its models are back, and
    /// starts the next one while running.
    fn maybe_done(&mut self, i: usize) -> Result<(), SwarmError> {
        let c = &mut self.conns[i];
        if c.awaited > 0 || c.next < self.parts.len() || !self.running {
            return Ok(());
        }
        c.iterations += 1;
        self.start_iteration(i)
    }

    fn on_readable(&mut self, i: usize) -> Result<(), SwarmError> {
        for _ in 0..READS_PER_WAKEUP {
            if !self.read_step(i)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Reads once from connection `i` and handles what it completed; `false` when the socket
    /// had nothing.
    fn read_step(&mut self, i: usize) -> Result<bool, SwarmError> {
        let of = self.conns.len();
        let c = &mut self.conns[i];
        let mut stream: &TcpStream = c.end.stream();
        let dst = match c.reading {
            Reading::Header => &mut c.hdr[c.hdr_got..],
            Reading::Model { left, .. } | Reading::Error { left } => {
                let n = left.min(self.scratch.len());
                &mut self.scratch[..n]
            }
        };
        let n = match stream.read(dst) {
            Ok(0) => return Err(fail(
                i,
                of,
                "the server closed the connection without a word (did it crash? its log follows)",
            )),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(fail(i, of, format!("reading: {e}"))),
        };
        match c.reading {
            Reading::Header => {
                c.hdr_got += n;
                if c.hdr_got < HEADER_LEN {
                    return Ok(true);
                }
                c.hdr_got = 0;
                let h = Header::decode(&c.hdr)
                    .and_then(|h| protocol::check_len(&h, Some(&self.parts)).map(|()| h))
                    .map_err(|e| fail(i, of, format!("a malformed frame from the server: {e}")))?;
                c.reading = match h.kind {
                    FrameKind::Model => Reading::Model {
                        key: h.key,
                        round: h.clock,
                        left: h.len as usize,
                    },
                    FrameKind::Error => Reading::Error {
                        left: h.len as usize,
                    },
                    FrameKind::Bye => {
                        return Err(fail(
                            i,
                            of,
                            "the server said goodbye before the bench ended",
                        ))
                    }
                    kind => {
                        return Err(fail(
                            i,
                            of,
                            format!("an unexpected {kind:?} frame from the server"),
                        ))
                    }
                };
            }
            Reading::Model { key, round, left } => {
                c.reading = Reading::Model {
                    key,
                    round,
                    left: left - n,
                };
            }
            Reading::Error { left } => {
                c.error_text.extend_from_slice(&self.scratch[..n]);
                c.reading = Reading::Error { left: left - n };
            }
        }
        match c.reading {
            Reading::Model {
                key,
                round,
                left: 0,
            } => {
                c.reading = Reading::Header;
                let p = key as usize;
                // A model nobody awaited (the server never sends one) is taken all the same.
                c.rounds[p] = round;
                c.awaited = c.awaited.saturating_sub(1);
                self.last_model = Instant::now();
                self.maybe_done(i)?;
            }
            Reading::Error { left: 0 } => {
                let text = String::from_utf8_lossy(&c.error_text).into_owned();
                return Err(fail(i, of, format!("the server dropped it: {text}")));
            }
            _ => {}
        }
        Ok(true)
    }
}
