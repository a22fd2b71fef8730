//! Synchronisation policies: when a part's model changes and when a worker gets it.
//!
//! A [`Policy`] is a deterministic state machine for one part: events and `now` in, [`Action`]s
//! out. The server keeps one instance per part and performs the actions in order. Two families
//! implement it, chosen by [`SyncMode`]:
//! - the barrier ([`Barrier`]): `naive` waits for every worker; the Het-Sync `timeout` barrier
//!   closes a round when everyone has pushed or a timeout after its first push expires;
//!   `adaptive` learns that timeout ([`AdaptiveTimeout`]);
//! - Angel's vector clock ([`VectorClock`]): every push applied as it arrives, reads held to a
//!   staleness bound: BSP (0), SSP (N), ASP (none).

mod adaptive;
mod barrier;
mod clocks;
mod policy;

pub use adaptive::AdaptiveTimeout;
pub use barrier::{Barrier, BarrierMode};
pub use clocks::VectorClock;
pub use policy::{Action, CloseCause, Policy, SyncError};

pub use hetsync_transport::protocol::PushClock;

use std::time::Duration;

/// The policy every part of a job runs, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// A round barrier: `naive`, `timeout` or `adaptive`.
    Barrier(BarrierMode),
    /// A vector clock with this staleness bound: `Some(0)` is BSP, `Some(n)` SSP, `None` ASP.
    Clocks(Option<u64>),
}

impl SyncMode {
    /// The naive barrier.
    pub const NAIVE: SyncMode = SyncMode::Barrier(BarrierMode::Naive);

    /// The Het-Sync timeout barrier with timeout `t`.
    pub fn timeout(t: Duration) -> Self {
        SyncMode::Barrier(BarrierMode::Timeout(t))
    }

    /// The policy called `name` (`naive`, `timeout`, `adaptive`, `bsp`, `ssp` or `asp`), with
    /// `timeout` for the barriers that have one (adaptive: its start and cap) and `staleness`
    /// for `ssp`. `None` for any other name.
    pub fn named(name: &str, timeout: Duration, staleness: u64) -> Option<Self> {
        Some(match name {
            "naive" => SyncMode::NAIVE,
            "timeout" => SyncMode::Barrier(BarrierMode::Timeout(timeout)),
            "adaptive" => SyncMode::Barrier(BarrierMode::Adaptive(timeout)),
            "bsp" => SyncMode::Clocks(Some(0)),
            "ssp" => SyncMode::Clocks(Some(staleness)),
            "asp" => SyncMode::Clocks(None),
            _ => return None,
        })
    }

    /// The policy's name: `naive`, `timeout`, `adaptive`, `bsp`, `ssp` or `asp`.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Barrier(BarrierMode::Naive) => "naive",
            SyncMode::Barrier(BarrierMode::Timeout(_)) => "timeout",
            SyncMode::Barrier(BarrierMode::Adaptive(_)) => "adaptive",
            SyncMode::Clocks(Some(0)) => "bsp",
            SyncMode::Clocks(Some(_)) => "ssp",
            SyncMode::Clocks(None) => "asp",
        }
    }

    /// A fresh policy for one part of a job of `workers` workers.
    pub fn policy(self, workers: usize) -> Box<dyn Policy> {
        match self {
            SyncMode::Barrier(mode) => Box::new(Barrier::new(mode, workers)),
            SyncMode::Clocks(staleness) => Box::new(VectorClock::new(staleness, workers)),
        }
    }

    /// What a push's clock means under this policy (told to workers in the handshake).
    pub fn push_clock(self) -> PushClock {
        match self {
            SyncMode::Barrier(_) => PushClock::ModelRound,
            SyncMode::Clocks(_) => PushClock::WorkerClock,
        }
    }

    /// Whether pushes are applied one by one (vector clocks) rather than in rounds.
    pub fn is_clocked(self) -> bool {
        matches!(self, SyncMode::Clocks(_))
    }
}

#[cfg(test)]
mod clock_tests;
#[cfg(test)]
mod tests;
