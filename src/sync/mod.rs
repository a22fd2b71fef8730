//! Synchronisation policies: when a round may close and when a worker gets the model.
//!
//! Policies are deterministic state machines: events and `now` in, [`Action`]s out. The server
//! performs the actions in order (aggregate, then serve). The vector-clock SSP/ASP controller and
//! the adaptive timeout plug in here with the same action vocabulary.

mod barrier;

pub use barrier::{Barrier, BarrierMode};

use crate::Rank;

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

#[cfg(test)]
mod tests;
