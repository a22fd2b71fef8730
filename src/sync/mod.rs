//! Synchronisation policies: when a round may close and when a worker gets the model.
//!
//! A [`Policy`] is a deterministic state machine for one part: events and `now` in, [`Action`]s
//! out. The server keeps one instance per part and performs the actions in order (aggregate, then
//! serve). `naive` and `timeout` ([`Barrier`]) implement it; the vector-clock SSP/ASP controller
//! and the adaptive timeout plug in beside them with the same vocabulary.

mod barrier;
mod policy;

pub use barrier::{Barrier, BarrierMode};
pub use policy::{Action, CloseCause, Policy, SyncError};

#[cfg(test)]
mod tests;
