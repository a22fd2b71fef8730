//! The round barrier: `naive` (wait for every worker, forever), the Het-Sync `timeout` barrier
//! (close when every worker pushed, or a fixed time after the round's first push, with whatever
//! arrived), and `adaptive`, the timeout barrier whose timeout is learnt ([`AdaptiveTimeout`]).
//!
//! A pure state machine in the style of quinn-proto: it is fed events with the current time and
//! answers with [`Action`]s pulled from [`Barrier::poll_action`]; its only timer is exposed by
//! [`Barrier::poll_timeout`] and fired by [`Barrier::handle_timeout`]. It reads no clock and touches
//! no socket, so every schedule can be replayed in a test.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::adaptive::AdaptiveTimeout;
use super::{Action, CloseCause, Policy, SyncError};
use crate::{Clock, Rank};

/// When a round may close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierMode {
    /// Only when every worker in the job has pushed: one straggler stalls everyone.
    Naive,
    /// When every worker has pushed, or this long after the round's first push.
    Timeout(Duration),
    /// Like `Timeout`, with the timeout learnt from recent rounds' arrivals, starting at and
    /// never exceeding this cap.
    Adaptive(Duration),
}

/// The barrier's state for one key.
#[derive(Debug)]
pub struct Barrier {
    mode: BarrierMode,
    /// Joined and not left.
    member: Vec<bool>,
    /// How many are members: a push checks "everyone arrived" in O(1), so a round of N
    /// workers costs O(N), not O(N^2).
    n_members: usize,
    /// Every worker has joined at least once: the model has been handed out and rounds run.
    started: bool,
    /// Rounds closed so far; pushes for this round are current.
    round: u64,
    /// Pushed for the current round.
    arrived: Vec<bool>,
    n_arrived: usize,
    /// When the current round closes unless everyone arrives first.
    deadline: Option<Instant>,
    /// When the current round got its first push.
    opened: Option<Instant>,
    /// When each worker was last sent a model (joined, or its round closed).
    served_at: Vec<Option<Instant>>,
    /// The learnt timeout, in `Adaptive` mode.
    adaptive: Option<AdaptiveTimeout>,
    actions: VecDeque<Action>,
}

impl Barrier {
    /// A barrier for `workers` workers, none joined yet.
    pub fn new(mode: BarrierMode, workers: usize) -> Self {
        Self {
            mode,
            member: vec![false; workers],
            n_members: 0,
            started: false,
            round: 0,
            arrived: vec![false; workers],
            n_arrived: 0,
            deadline: None,
            opened: None,
            served_at: vec![None; workers],
            adaptive: match mode {
                BarrierMode::Adaptive(cap) => Some(AdaptiveTimeout::new(cap, workers)),
                _ => None,
            },
            actions: VecDeque::new(),
        }
    }

    fn serve(&mut self, rank: Rank, now: Instant) {
        self.served_at[rank as usize] = Some(now);
        self.actions.push_back(Action::Serve {
            rank,
            clock: self.round,
            min_clock: self.round,
        });
    }

    fn maybe_close(&mut self, now: Instant) {
        if self.n_arrived == 0 {
            return;
        }
        // Only members arrive (a leaving worker's arrival is withdrawn).
        let everyone = self.n_arrived == self.n_members;
        let expected = self.adaptive.as_ref().is_some_and(|ad| {
            (0..self.member.len()).all(|w| !self.member[w] || self.arrived[w] || !ad.expected(w))
        });
        let cause = if everyone {
            CloseCause::AllArrived
        } else if expected {
            CloseCause::SlowSkipped
        } else if self.deadline.is_some_and(|d| now >= d) {
            CloseCause::Timeout
        } else {
            return;
        };
        let participants: Vec<Rank> = (0..self.arrived.len())
            .filter(|&w| self.arrived[w])
            .map(|w| w as Rank)
            .collect();
        let missing = self.members() - participants.len();
        self.actions.push_back(Action::CloseRound {
            round: self.round,
            participants: participants.clone(),
            missing,
            cause,
        });
        self.round += 1;
        self.arrived.iter_mut().for_each(|a| *a = false);
        self.n_arrived = 0;
        self.deadline = None;
        self.opened = None;
        for rank in participants {
            self.serve(rank, now);
        }
    }
}

impl Policy for Barrier {
    /// Rounds closed so far: the version of the current model.
    fn round(&self) -> Clock {
        self.round
    }

    /// Rounds closed so far: every worker is at (or past) this round.
    fn min_clock(&self) -> Clock {
        self.round
    }

    /// Whether every worker has joined and rounds are running.
    fn started(&self) -> bool {
        self.started
    }

    /// Workers currently in the job.
    fn members(&self) -> usize {
        self.n_members
    }

    /// Every worker is at the round.
    fn clocks(&self) -> Vec<Clock> {
        vec![self.round; self.member.len()]
    }

    /// Continues at round `round` (for a barrier its rounds are its clock).
    fn resume(&mut self, round: Clock, _clocks: &[Clock]) {
        self.round = round;
    }

    /// Starts rounds with the workers present.
    fn start(&mut self, now: Instant) {
        if self.started || !self.member.contains(&true) {
            return;
        }
        self.started = true;
        for w in 0..self.member.len() {
            if self.member[w] {
                self.serve(w as Rank, now);
            }
        }
    }

    /// Members that have not pushed in a round that others have, each since the later of the
    /// round's first push and when it was last sent a model.
    fn awaited(&self) -> Vec<(Rank, Instant)> {
        let Some(opened) = self.opened else {
            return Vec::new();
        };
        (0..self.member.len())
            .filter(|&w| self.member[w] && !self.arrived[w])
            .map(|w| {
                (
                    w as Rank,
                    self.served_at[w].map_or(opened, |t| t.max(opened)),
                )
            })
            .collect()
    }

    /// Worker `rank` joined. Until every worker has joined once, nobody gets the model; after
    /// that, a (re)joining worker gets the current model at once.
    fn on_join(&mut self, rank: Rank, now: Instant) {
        let r = rank as usize;
        self.n_members += usize::from(!self.member[r]);
        self.member[r] = true;
        if self.started {
            self.serve(rank, now);
        } else if self.member.iter().all(|&m| m) {
            self.started = true;
            for w in 0..self.member.len() {
                self.serve(w as Rank, now);
            }
        }
    }

    /// Worker `rank` left. A gradient it pushed for the current round leaves with it; the round
    /// may now be complete without it.
    fn on_leave(&mut self, rank: Rank, now: Instant) {
        let r = rank as usize;
        self.n_members -= usize::from(self.member[r]);
        self.member[r] = false;
        if let Some(a) = self.adaptive.as_mut() {
            a.forget(r);
        }
        if self.arrived[r] {
            self.arrived[r] = false;
            self.n_arrived -= 1;
            if self.n_arrived == 0 {
                self.deadline = None;
                self.opened = None;
            }
        }
        self.maybe_close(now);
    }

    /// Worker `rank` pushed a gradient computed on the model of round `clock`.
    ///
    /// A push for an earlier round is late ([`Action::Late`]: the server folds or drops it) and
    /// the worker gets the current model at once, so it rejoins the current round. A push the worker could not have made (before it
    /// was given a model, for a future round, twice in a round) is an error: drop the worker.
    fn on_push(&mut self, rank: Rank, clock: Clock, now: Instant) -> Result<(), SyncError> {
        let r = rank as usize;
        if !self.member[r] {
            return Err(SyncError::NotMember { rank });
        }
        if !self.started {
            return Err(SyncError::NotStarted { rank });
        }
        if clock > self.round {
            return Err(SyncError::FromTheFuture {
                rank,
                clock,
                round: self.round,
            });
        }
        if let Some(a) = self.adaptive.as_mut() {
            if clock == self.round && self.deadline.is_none() {
                a.first_push(clock, now);
            }
            a.arrival(r, clock, now, clock == self.round);
        }
        if clock < self.round {
            self.actions.push_back(Action::Late {
                rank,
                clock,
                round: self.round,
            });
            self.serve(rank, now);
            return Ok(());
        }
        if self.arrived[r] {
            return Err(SyncError::Duplicate {
                rank,
                round: self.round,
            });
        }
        self.arrived[r] = true;
        self.n_arrived += 1;
        self.opened.get_or_insert(now);
        if self.deadline.is_none() {
            match (self.mode, self.adaptive.as_mut()) {
                (BarrierMode::Timeout(t), _) => self.deadline = Some(now + t),
                (BarrierMode::Adaptive(_), Some(a)) => self.deadline = Some(now + a.timeout()),
                _ => {}
            }
        }
        self.maybe_close(now);
        Ok(())
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) must be called, if any.
    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Fires the round timer if `now` has reached it.
    fn handle_timeout(&mut self, now: Instant) {
        self.maybe_close(now);
    }

    /// The next thing the server must do. Call after every event until it returns `None`.
    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}
