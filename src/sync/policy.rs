//! The interface every synchronisation policy implements, and the vocabulary it speaks.

use std::time::Instant;

use crate::{Clock, Rank};

/// A synchronisation policy for one part, in the style of quinn-proto: fed events with the
/// current time, it answers with [`Action`]s pulled from [`poll_action`](Policy::poll_action);
/// its timers are exposed by [`poll_timeout`](Policy::poll_timeout) and fired by
/// [`handle_timeout`](Policy::handle_timeout). It reads no clock and touches no socket, so every
/// schedule can be replayed in a test.
///
/// Policies that let workers run ahead (vector clocks) accept pushes for clocks past
/// [`round`](Policy::round) and hold reads back with `Serve` actions issued later; barrier
/// policies treat such a push as an error.
pub trait Policy: std::fmt::Debug + Send {
    /// Worker `rank` joined.
    fn on_join(&mut self, rank: Rank, now: Instant);

    /// Worker `rank` left; a gradient it pushed and that no round has taken leaves with it.
    fn on_leave(&mut self, rank: Rank, now: Instant);

    /// Worker `rank` pushed a gradient computed on the model of round `clock`. An error means the
    /// worker could not legitimately have made this push: drop it.
    fn on_push(&mut self, rank: Rank, clock: Clock, now: Instant) -> Result<(), SyncError>;

    /// The next time [`handle_timeout`](Policy::handle_timeout) must be called, if any.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Fires the timers that `now` has reached.
    fn handle_timeout(&mut self, now: Instant);

    /// The next thing the server must do. Call after every event until it returns `None`.
    #[must_use]
    fn poll_action(&mut self) -> Option<Action>;

    /// Rounds closed so far: the round of the model a `Serve` sends.
    fn round(&self) -> Clock;

    /// Whether training has started (every worker joined once).
    fn started(&self) -> bool;

    /// Workers currently in the job.
    fn members(&self) -> usize;
}

/// Why a round closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// Every worker in the job pushed.
    AllArrived,
    /// The timeout after the round's first push expired.
    Timeout,
}

/// What the server must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sum the slots of `participants`, apply the update: the model becomes version `round + 1`.
    CloseRound {
        /// The round that closes.
        round: u64,
        /// Workers whose gradients are in this round, ascending.
        participants: Vec<Rank>,
        /// Workers in the job whose gradient did not make it (stragglers).
        missing: usize,
        /// Why it closed.
        cause: CloseCause,
    },
    /// Send worker `rank` the current model, handing its slot back.
    Serve {
        /// The worker.
        rank: Rank,
    },
    /// A gradient computed on the model of round `clock` arrived while round `round` was open: it
    /// is dropped (a later policy may fold it in instead).
    DiscardLate {
        /// The worker.
        rank: Rank,
        /// The round its gradient was computed on.
        clock: u64,
        /// The round open when it arrived.
        round: u64,
    },
}

/// A push the worker could not legitimately have made; the server drops that worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// The worker is not in the job.
    #[error("worker {rank} pushed without having joined")]
    NotMember {
        /// The worker.
        rank: Rank,
    },
    /// Rounds have not started: nobody has been given a model to compute on.
    #[error("worker {rank} pushed before training started (it was never sent a model)")]
    NotStarted {
        /// The worker.
        rank: Rank,
    },
    /// A clock the server has not reached.
    #[error("worker {rank} pushed for round {clock}, but the server is at round {round}")]
    FromTheFuture {
        /// The worker.
        rank: Rank,
        /// The clock it sent.
        clock: u64,
        /// The server's round.
        round: u64,
    },
    /// A second push in the same round.
    #[error("worker {rank} pushed twice in round {round}")]
    Duplicate {
        /// The worker.
        rank: Rank,
        /// The round.
        round: u64,
    },
}
