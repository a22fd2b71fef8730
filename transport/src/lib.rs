//! Het-Sync transports: the wire protocol, the mmapped slot region, and the [`Transport`] trait
//! the server drives, with its non-blocking epoll TCP implementation ([`tcp`]).
//!
//! The server never knows which transport it drives. A transport owns the [`SlotRegion`]
//! (RDMA must register it for as long as it lives), tells the server "worker w's gradient for key k
//! at clock c is in its slot" ([`Event::Pushed`]), and sends the model from the region when asked
//! ([`Transport::send_model`]). Between a push and the reply the slot belongs to the server: a
//! transport refuses a second push from that worker until the reply went out, so nothing can land
//! in memory that is being summed.

#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
// Only the RDMA module may use `unsafe`, to post sends whose buffers it keeps alive.
#![deny(unsafe_code)]

pub mod any;
pub mod protocol;
#[cfg(feature = "rdma")]
#[allow(unsafe_code)]
pub mod rdma;
pub mod region;
pub mod tcp;

use std::io;
use std::time::Duration;

pub use region::{RegionLayout, SlotRegion, Slots};

/// A worker's rank, `0..workers`.
pub type Rank = u32;

/// What a transport reports to the server.
#[derive(Debug)]
pub enum Event {
    /// A worker completed the handshake (version, rank and tensor sizes all matched).
    Joined {
        /// The worker.
        rank: Rank,
    },
    /// Worker `rank`'s gradient for `key`, computed on the model of round `clock`, is complete in
    /// its slot. The slot now belongs to the server until [`Transport::send_model`] for that
    /// worker.
    Pushed {
        /// The worker.
        rank: Rank,
        /// The tensor.
        key: u32,
        /// The round of the model the gradient was computed on.
        clock: u64,
    },
    /// A joined worker is gone; its rank may join again.
    Left {
        /// The worker.
        rank: Rank,
        /// Why.
        reason: LeaveReason,
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

/// The wait a transport's `poll` should use: none at all while it holds undelivered events.
pub(crate) fn wait_for(pending: &[Event], timeout: Option<Duration>) -> Option<Duration> {
    if pending.is_empty() {
        timeout
    } else {
        Some(Duration::ZERO)
    }
}

impl TransportError {
    pub(crate) fn os(op: &'static str, e: impl Into<io::Error>) -> Self {
        TransportError::Os {
            op,
            source: e.into(),
        }
    }
}

/// What the server needs from a transport: a handful of calls both TCP and RDMA can implement.
pub trait Transport {
    /// The region holding the models and every worker's gradient slots.
    fn region(&self) -> &SlotRegion;

    /// The region, mutable: the engine sums slots into the model here. Before returning, the
    /// transport makes sure no send still in flight reads a model that may now change (TCP copies
    /// the unsent rest of queued models; RDMA waits for the writes' completions).
    fn region_mut(&mut self) -> &mut SlotRegion;

    /// Waits up to `timeout` (forever when `None`) for something to happen and appends what did
    /// to `events`. Returns early, possibly with no events, when a signal interrupts the wait.
    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError>;

    /// Sends worker `rank` the region's model of `key`, stamped with `round`, and hands its slot
    /// back to it. A peer that is gone is ignored; a send that fails drops that peer and is
    /// reported by the next [`poll`](Transport::poll) as [`Event::Left`].
    fn send_model(&mut self, rank: Rank, key: u32, round: u64);

    /// Drops worker `rank`, telling it why. Reported by the next poll as [`Event::Left`].
    fn disconnect(&mut self, rank: Rank, why: &str);

    /// Says goodbye to every peer and flushes what is queued, waiting at most `grace`.
    fn shutdown(&mut self, grace: Duration);
}

/// What a worker receives while waiting for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// The model of `key` after `round` closed rounds is now in [`WorkerLink::model`].
    Model {
        /// The tensor.
        key: u32,
        /// Rounds the server has closed.
        round: u64,
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

/// What a worker needs from a transport: buffers the transport owns (registered memory on RDMA),
/// a push of the gradient buffer, and a wait for the model.
pub trait WorkerLink {
    /// The latest model of `key` and its gradient buffer, together, so a gradient can be computed
    /// from the model without a copy: fill the buffer, then [`push`](WorkerLink::push).
    fn model_and_gradient(&mut self, key: u32) -> (&[f32], &mut [f32]);

    /// The latest model of `key` received.
    fn model(&self, key: u32) -> &[f32];

    /// Sends the gradient buffer of `key`, computed on the model of round `clock`.
    fn push(&mut self, key: u32, clock: u64) -> Result<(), LinkError>;

    /// Blocks until the server sends a model (or says goodbye).
    fn wait_model(&mut self) -> Result<Incoming, LinkError>;

    /// Tells the server this worker is leaving, and closes.
    fn bye(&mut self) -> Result<(), LinkError>;
}
