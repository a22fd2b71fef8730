//! Het-Sync transports: the wire protocol ([`protocol`]), the memory arena the server lends to its
//! transport ([`memory`]), and the [`Transport`] trait with its two implementations: epoll TCP
//! ([`tcp`]) and RDMA verbs ([`rdma`]), both over the TCP machinery in [`channel`], picked by
//! [`any`].
//!
//! Transports move bytes and never decide when. The server core owns the [`Arena`] and lends it to
//! every call; a transport receives pushes into the arena's slots (TCP reads them there, RDMA lets
//! the NIC write them), hands each complete one over to the server and reports it
//! ([`Event::Pushed`]), and sends models from the arena when asked. The server core hands a slot
//! back once it is done with the gradient; the transport lends all of a worker's slots again when
//! its connection ends.

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
// Only the RDMA module and the arena may use `unsafe` (posting sends whose buffers outlive them;
// slices over memory a NIC writes); each says why at the top.
#![deny(unsafe_code)]

pub mod any;
pub mod auth;
pub mod channel;
pub mod memory;
pub mod protocol;
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub mod rdma;
pub mod spin;
pub mod tcp;

use std::io;
use std::time::{Duration, Instant};

pub use memory::{Arena, ArenaError, ArenaPin, SlotState, Update, Version};

/// A worker's rank, `0..workers` (32 bits on the wire).
pub type Rank = u32;
/// A part's index: the key of a push or model frame (32 bits on the wire).
pub type Key = u32;
/// A round, or a worker's clock (64 bits on the wire).
pub type Clock = u64;

/// What a transport reports to the server.
#[derive(Debug)]
pub enum Event {
    /// A worker completed the handshake (version, rank and tensor sizes all matched).
    Joined {
        /// The worker.
        rank: Rank,
    },
    /// Worker `rank`'s gradient for part `key`, computed on the model of round `clock`, is
    /// complete in its slot, and the arena says the server holds it
    /// ([`Arena::gradient`]) until [`Transport::send_model`] for that worker and part.
    Pushed {
        /// The worker.
        rank: Rank,
        /// The part.
        key: Key,
        /// The round of the model the gradient was computed on.
        clock: Clock,
    },
    /// A joined worker is gone; its rank may join again.
    Left {
        /// The worker.
        rank: Rank,
        /// Why.
        reason: LeaveReason,
    },
    /// A client asked how the job is doing (`hetsync status`; authenticated like a worker
    /// when the job has a secret). Answer with [`Transport::answer_status`].
    StatusRequested {
        /// Which request, to answer it.
        request: u64,
    },
    /// A connection that never completed the handshake was refused or failed. Informational:
    /// nothing in the job changed.
    Refused {
        /// Who connected.
        peer: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Why a worker left.
#[derive(Debug)]
pub enum LeaveReason {
    /// It said goodbye.
    Bye,
    /// The server dropped it (e.g. a protocol violation the server's policy saw).
    Dropped(String),
    /// Its connection broke or it sent something malformed.
    Failed(PeerError),
}

impl std::fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaveReason::Bye => f.write_str("said goodbye"),
            LeaveReason::Dropped(why) => write!(f, "dropped by the server: {why}"),
            LeaveReason::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// What went wrong with one peer. The peer is dropped; everyone else is unaffected.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A socket call failed.
    #[error("{op} with {peer} failed: {source}")]
    Io {
        /// The operation, e.g. "read" or "write".
        op: &'static str,
        /// The peer's address.
        peer: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The peer sent a malformed or unexpected frame.
    #[error("protocol violation from {peer}: {source}")]
    Protocol {
        /// The peer's address.
        peer: String,
        /// What was wrong.
        #[source]
        source: protocol::ProtocolError,
    },
    /// The peer closed its connection without saying goodbye.
    #[error("{peer} closed the connection {when}")]
    Closed {
        /// The peer's address.
        peer: String,
        /// At what point, e.g. "in the middle of a frame".
        when: &'static str,
    },
    /// The peer reported an error of its own and left.
    #[error("{peer} reported an error: {message}")]
    Remote {
        /// The peer's address.
        peer: String,
        /// Its message.
        message: String,
    },
}

/// A failure of the transport as a whole (not of one peer): the server cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Setting up the listening socket failed.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
        /// A suggestion for the user.
        hint: &'static str,
    },
    /// The RDMA device could not be set up.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] hetsync_ffi::VerbsError),
    /// RDMA was asked for, but this build has no RDMA support.
    #[error("this hetsync was built without RDMA support (rebuild with the default features, or use --transport tcp)")]
    NoRdmaSupport,
    /// A call on the transport's own machinery (epoll, timerfd, mmap) failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    pub(crate) fn os(op: &'static str, e: impl Into<io::Error>) -> Self {
        TransportError::Os {
            op,
            source: e.into(),
        }
    }
}

/// What the server needs from a transport: a handful of calls both TCP and RDMA implement. The
/// server never knows which one it drives; every call is lent the server's [`Arena`].
pub trait Transport {
    /// Waits until `deadline` at the latest (forever when `None`) for something to happen and
    /// appends what did to `events`. Returns early, possibly with no events, when a signal
    /// interrupts the wait. Passing the same deadline again costs no timer syscall.
    fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError>;

    /// Sends worker `rank` part `key`'s current model, stamped with its round. A peer that is
    /// gone is ignored; a send that fails drops that peer and is reported by the next
    /// [`poll`](Transport::poll) as [`Event::Left`]. When a peer's connection ends, the transport
    /// lends all its slots again ([`Arena::reset_worker`]) before it admits that rank anew.
    fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key);

    /// Makes sure no send reads version `version` of part `key` any more, so an update may
    /// write it: TCP copies what a slow reader has not taken yet into that reader's own queue,
    /// RDMA waits for the writes' completions (dropping a peer whose write never completes).
    /// Only needed for a peer that left a whole round's model unread.
    fn release(&mut self, arena: &mut Arena, key: Key, version: Version);

    /// Drops worker `rank`, telling it why. Reported by the next poll as [`Event::Left`].
    fn disconnect(&mut self, arena: &mut Arena, rank: Rank, why: &str);

    /// Says goodbye to every peer and flushes what is queued, waiting at most `grace`.
    fn shutdown(&mut self, arena: &mut Arena, grace: Duration);

    /// Answers status request `request` with `report` (JSON) and closes its connection. A
    /// request whose client is gone is ignored.
    fn answer_status(&mut self, arena: &mut Arena, request: u64, report: &[u8]);

    /// How worker `rank` is connected, while it is.
    fn peer(&self, rank: Rank) -> Option<PeerInfo>;
}

/// How a worker is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its address.
    pub addr: String,
    /// `tcp` or `rdma`.
    pub transport: &'static str,
}

/// What a worker receives while waiting for models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Part `key`'s model after `round` rounds of that part is now in its tensor's model buffer
    /// ([`WorkerLink::model`]).
    Model {
        /// The part.
        key: Key,
        /// Rounds the server has closed on that part.
        round: Clock,
    },
    /// The server is shutting down in an orderly way.
    Shutdown,
}

/// A failure of a worker's link to the server.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The server could not be reached.
    #[error("cannot connect to server {addr}: {source}{hint}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The last OS error.
        #[source]
        source: io::Error,
        /// A suggestion for the user.
        hint: &'static str,
    },
    /// The server refused the handshake, or dropped this worker, and said why.
    #[error("server {peer} refused this worker: {reason}")]
    Refused {
        /// The server's address.
        peer: String,
        /// The server's reason.
        reason: String,
    },
    /// The connection broke or the server sent something malformed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Setting up or using RDMA failed.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] hetsync_ffi::VerbsError),
    /// An RDMA transfer failed.
    #[cfg(feature = "rdma")]
    #[error("RDMA transfer failed: {0}")]
    RdmaTransfer(#[from] hetsync_ffi::CompletionError),
    /// RDMA was required but is not available (no device here, none on the server, or a build
    /// without RDMA).
    #[error("RDMA is not available: {0}")]
    NoRdma(String),
}

/// How long a wait for the other side polls before it sleeps, by default (workers and server):
/// long enough to catch a reply on its way (a round trip on one host takes tens of
/// microseconds), short enough to cost little when the other side is not about to answer. No
/// spinning on a single CPU, where it only delays the process being waited for.
pub fn default_spin() -> Duration {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus > 1 {
        Duration::from_micros(50)
    } else {
        Duration::ZERO
    }
}

/// What a worker needs from a transport: a model and a gradient buffer per tensor, owned by the
/// link (registered memory on RDMA), pushes of parts of the gradient, and a wait for models.
/// Pushes of several parts may be in flight at once, one per part.
pub trait WorkerLink {
    /// The job's parts, as the server's partition size cuts them.
    fn parts(&self) -> &protocol::Parts;

    /// What the clock of a push means on this job (the server's welcome said).
    fn push_clock(&self) -> protocol::PushClock;

    /// Tensor `t`'s latest model and its gradient buffer, together, so a gradient can be computed
    /// from the model without a copy: fill the buffer, then [`push`](WorkerLink::push) its parts.
    fn tensor(&mut self, t: usize) -> (&[f32], &mut [f32]);

    /// Tensor `t`'s latest model.
    fn model(&self, t: usize) -> &[f32];

    /// Sends part `key` of its tensor's gradient buffer, computed on the model of round `clock`.
    /// The part's gradient may be written again, and its model read, only once that part's model
    /// has come back ([`wait_model`](WorkerLink::wait_model)): over RDMA the NIC reads the one
    /// and writes the other in the meantime.
    fn push(&mut self, key: Key, clock: Clock) -> Result<(), LinkError>;

    /// Part `key`'s latest model and its gradient buffer (the part's share of
    /// [`tensor`](WorkerLink::tensor)), to compute and push one part while others travel.
    fn part(&mut self, key: Key) -> (&[f32], &mut [f32]) {
        let part = self.parts()[key];
        let (model, grad) = self.tensor(part.tensor as usize);
        (&model[part.elems()], &mut grad[part.elems()])
    }

    /// Hands every push made so far to the transport whole (TCP queues what the socket does not
    /// take at once and writes it on later calls; RDMA posts each push whole already). Reads
    /// arriving models meanwhile.
    fn flush(&mut self) -> Result<(), LinkError> {
        Ok(())
    }

    /// How long a wait polls for the model before it sleeps (see [`default_spin`]): zero never
    /// spins; a few tens of microseconds save a wake-up per reply when a core is free for it.
    fn set_spin(&mut self, spin: Duration);

    /// Waits until the server sends a part's model (or says goodbye), at most `timeout` when
    /// given: `None` means nothing came in that time, or a signal interrupted the wait (so the
    /// caller can look at it, e.g. Python's Ctrl-C). A frame partly read is kept: the next wait
    /// goes on with it.
    fn wait_model_for(&mut self, timeout: Option<Duration>) -> Result<Option<Incoming>, LinkError>;

    /// Blocks until the server sends a part's model (or says goodbye).
    fn wait_model(&mut self) -> Result<Incoming, LinkError> {
        loop {
            if let Some(m) = self.wait_model_for(None)? {
                return Ok(m);
            }
        }
    }

    /// Tells the server this worker is leaving, and closes.
    fn bye(&mut self) -> Result<(), LinkError>;
}
