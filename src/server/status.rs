//! `hetsync status`: what the server tells a client that asks (authenticated like a worker when
//! the job has a secret): policy, rounds or clocks per tensor, who is connected and how,
//! counters, uptime.

use std::time::Instant;

use hetsync_transport::Transport;
use serde::Serialize;

use super::{Server, ServerStats};
use crate::{Clock, Key, Rank};

/// A connected worker.
#[derive(Debug, Serialize)]
struct Member {
    rank: Rank,
    addr: String,
    transport: &'static str,
}

/// One tensor's progress.
#[derive(Debug, Serialize)]
struct Tensor {
    key: u32,
    /// Rounds (barrier) or clocks (vector clock) every worker has completed on every part.
    completed: Clock,
    /// Updates applied to its model (the oldest part's).
    updates: Clock,
}

/// The report, as JSON.
#[derive(Debug, Serialize)]
struct Report<'a> {
    policy: &'static str,
    workers: usize,
    connected: Vec<Member>,
    started: bool,
    uptime_s: f64,
    training_s: f64,
    rounds: u64,
    tensors: Vec<Tensor>,
    stats: &'a ServerStats,
}

/// Sorts a refusal into a few kinds, for the counters by reason.
pub(super) fn refusal_kind(reason: &str) -> &'static str {
    let has = |w: &str| reason.contains(w);
    if has("handshake within") {
        "handshake_timeout"
    } else if has("without a handshake") {
        "pending_full"
    } else if has("secret") || has("authenticat") {
        "authentication"
    } else if has("already connected") {
        "rank_held"
    } else if has("mismatch") || has("out of range") {
        "wrong_job"
    } else if has("accept failed") {
        "accept_failed"
    } else if has("protocol") || has("magic") || has("version") {
        "protocol"
    } else {
        "other"
    }
}

impl<T: Transport> Server<T> {
    /// Answers status request `request`.
    pub(super) fn answer_status(&mut self, request: u64, now: Instant) {
        let mut tensors: Vec<Tensor> = Vec::new();
        for key in 0..self.tensors.len() as Key {
            let (tensor, index, _) = self.tensors.part_of(key);
            let p = self.tensors.policy(key);
            let (completed, updates) = (p.min_clock(), p.round());
            if index == 0 {
                tensors.push(Tensor {
                    key: tensor,
                    completed,
                    updates,
                });
            } else if let Some(t) = tensors.last_mut() {
                t.completed = t.completed.min(completed);
                t.updates = t.updates.min(updates);
            }
        }
        let connected = (0..self.cfg.workers as Rank)
            .filter_map(|rank| {
                self.transport.peer(rank).map(|p| Member {
                    rank,
                    addr: p.addr,
                    transport: p.transport,
                })
            })
            .collect();
        let report = Report {
            policy: self.cfg.mode.name(),
            workers: self.cfg.workers,
            connected,
            started: self.started.is_some(),
            uptime_s: (now - self.born).as_secs_f64(),
            training_s: self.started.map_or(0.0, |t0| (now - t0).as_secs_f64()),
            rounds: self.stats.rounds,
            tensors,
            stats: &self.stats,
        };
        let json = serde_json::to_vec(&report).expect("a report serialises");
        self.transport
            .answer_status(&mut self.arena, request, &json);
    }
}
