//! The interface every synchronisation policy implements, and the vocabulary it speaks.

use std::time::Instant;

use crate::{Clock, Rank};

/// A synchronisation policy for one part, in the style of quinn-proto: fed events with the
/// current time, it answers with [`Action`]s pulled from [`poll_action`](Policy::poll_action);
/// its timers are exposed by [`poll_timeout`](Policy::poll_timeout) and fired by
/// [`handle_timeout`](Policy::handle_timeout). It reads no clock and touches no socket, so every
/// schedule can be replayed in a test.
///
/// Two families implement it. Barrier policies ([`Barrier`](super::Barrier)) collect a round's
/// pushes and close it ([`Action::CloseRound`]); a push's clock is the round of the model it was
/// computed on. Vector-clock policies ([`VectorClock`](super::VectorClock)) apply every push as
/// it arrives ([`Action::Apply`]) and hold a worker's next read back until the bound allows it;
/// a push's clock is the worker's own.
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

    /// Updates applied to the part's model so far (rounds closed, or pushes applied): the round
    /// stamp of the model a `Serve` sends.
    fn round(&self) -> Clock;

    /// How far every worker in the job has come: rounds closed for a barrier, the slowest
    /// member's clock for a vector clock. Never decreases.
    fn min_clock(&self) -> Clock;

    /// Whether training has started (every worker joined once, or [`start`](Policy::start)).
    fn started(&self) -> bool;

    /// Starts training now with the workers present (`--start-after-ms`); the others join later
    /// like workers that reconnect. No-op once started or while nobody is present.
    fn start(&mut self, now: Instant);

    /// Every worker's clock, for a checkpoint: how many rounds or clocks it has completed on
    /// this part (a worker not in the job counts as the slowest member, where it would rejoin).
    fn clocks(&self) -> Vec<Clock>;

    /// Continues from a checkpoint, before anyone joined: the part's model is at `round`
    /// (updates applied) and each worker had completed `clocks[rank]`; workers (re)joining
    /// start there, their own numbering at 0 again.
    fn resume(&mut self, round: Clock, clocks: &[Clock]);

    /// The workers everyone is waiting for, each with since when: members that have not pushed
    /// in a round others have (barrier), or the slowest workers while reads are held for them
    /// (vector clock); a worker counts only from when it was last sent a model. Empty while
    /// nobody waits.
    fn awaited(&self) -> Vec<(Rank, Instant)>;

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
    /// Every worker not written off as persistently slow pushed (`adaptive`).
    SlowSkipped,
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
    /// Apply worker `rank`'s gradient, pushed at its clock `clock`, to the model at once, scaled
    /// by one over the job's workers (so one push from each moves the model as one naive round
    /// does): the model's round advances by one. Vector-clock policies only.
    Apply {
        /// The worker.
        rank: Rank,
        /// Its clock (in the job's numbering) the push completes.
        clock: Clock,
    },
    /// Send worker `rank` the current model: its read at clock `clock`.
    Serve {
        /// The worker.
        rank: Rank,
        /// The clock of the read: for a barrier the round of the model; for a vector clock the
        /// worker's clock.
        clock: Clock,
        /// The part's slowest clock when the read is served (`clock - min_clock` is how far the
        /// worker runs ahead; at most the staleness bound).
        min_clock: Clock,
    },
    /// A gradient computed on the model of round `clock` arrived while round `round` was open:
    /// the server folds it into the next round it closes or drops it (`--late`), then serves the
    /// worker the current model. Barrier policies only.
    Late {
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
    /// A push at another clock than the worker's clock on this part (one it completed already,
    /// or one it skipped to).
    #[error("worker {rank} pushed at clock {clock}, but its clock on this part is {expected}")]
    WrongClock {
        /// The worker.
        rank: Rank,
        /// The clock it sent (its own numbering).
        clock: u64,
        /// Its clock on the part (its own numbering).
        expected: u64,
    },
    /// A push made before the worker's read was served: it cannot have a model to compute on.
    #[error("worker {rank} pushed before its read at clock {clock} was served")]
    ReadPending {
        /// The worker.
        rank: Rank,
        /// The read's clock.
        clock: u64,
    },
}
