//! Angel's sync controller: a vector clock per part, with BSP, SSP and ASP as staleness bounds.
//!
//! The part keeps one clock per worker: how many iterations it has completed on the part. A push
//! at clock `c` is applied to the model as it arrives ([`Action::Apply`]) and completes the
//! worker's iteration `c`; the model it gets back is its *read* at clock `c + 1`, which is served
//! once the part's slowest clock (over the workers in the job) is at least `c + 1 - N`
//! ([`Action::Serve`]), where N is the staleness: 0 is BSP, N > 0 is SSP, and ASP has no bound
//! (every read is served at once). A read that must wait is held by the policy and served by the
//! event that lets it go: no polling anywhere.
//!
//! Under BSP every gradient of iteration `c` is applied before anyone reads at `c + 1`: the model
//! goes through the same steps as the naive barrier's, one push at a time.
//!
//! A worker's clock on a part advances with its pushes of that part (the client ticks, on
//! `clock()`, every key it pushed), so the only legitimate push is at exactly the worker's clock
//! on the part, and only once its read there was served: anything else (a clock it completed
//! already, one it skipped to, a push while its read is held) is an error and drops the worker.
//! A served read never breaks the bound and the bound's minimum never decreases, so an accepted
//! push is always within N of the slowest worker. A worker that joins again after the start
//! starts at the slowest member's clock (its own numbering restarts at 0; the policy keeps the
//! offset). Pure: fed with `now`, which it does not even need.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Action, Policy, SyncError};
use crate::{Clock, Rank};

/// The vector-clock policy of one part: BSP, SSP or ASP by its staleness bound (see the
/// [`sync`](crate::sync) module).
#[derive(Debug)]
pub struct VectorClock {
    /// `None`: ASP, no bound.
    staleness: Option<u64>,
    member: Vec<bool>,
    started: bool,
    /// Per worker, the clocks it has completed on this part, in the job's numbering: the clock
    /// its next push carries and the clock of its read.
    clock: Vec<Clock>,
    /// Per worker, what to add to the clocks it sends (non-zero after a rejoin).
    base: Vec<Clock>,
    /// Per worker, whether its read at `clock` is held back.
    waiting: Vec<bool>,
    /// Per worker, since when its read is held (after a push).
    held_since: Vec<Option<Instant>>,
    /// Per worker, when its last read was served.
    served_at: Vec<Option<Instant>>,
    /// The slowest member's clock (the last known one when nobody is in the job).
    min: Clock,
    applied: Clock,
    actions: VecDeque<Action>,
}

impl VectorClock {
    /// A vector clock for `workers` workers, none joined yet, with staleness bound `staleness`
    /// (`Some(0)`: BSP, `Some(n)`: SSP, `None`: ASP).
    pub fn new(staleness: Option<u64>, workers: usize) -> Self {
        Self {
            staleness,
            member: vec![false; workers],
            started: false,
            clock: vec![0; workers],
            base: vec![0; workers],
            waiting: vec![false; workers],
            held_since: vec![None; workers],
            served_at: vec![None; workers],
            min: 0,
            applied: 0,
            actions: VecDeque::new(),
        }
    }

    /// Worker `rank`'s clock on this part (the job's numbering).
    pub fn clock_of(&self, rank: Rank) -> Clock {
        self.clock[rank as usize]
    }

    fn allowed(&self, read: Clock) -> bool {
        self.staleness
            .is_none_or(|n| read <= self.min.saturating_add(n))
    }

    fn update_min(&mut self) {
        let m = (0..self.member.len())
            .filter(|&w| self.member[w])
            .map(|w| self.clock[w])
            .min();
        if let Some(m) = m {
            self.min = self.min.max(m);
        }
    }

    /// Serves every held read the bound now allows, in rank order.
    fn release(&mut self, now: Instant) {
        for w in 0..self.waiting.len() {
            if self.waiting[w] && self.allowed(self.clock[w]) {
                self.waiting[w] = false;
                self.held_since[w] = None;
                self.served_at[w] = Some(now);
                self.actions.push_back(Action::Serve {
                    rank: w as Rank,
                    clock: self.clock[w],
                    min_clock: self.min,
                });
            }
        }
    }
}

impl Policy for VectorClock {
    /// Worker `rank` joined. Once every worker has joined, everyone reads at clock 0; a worker
    /// joining after that starts at the slowest member's clock and reads at once.
    fn on_join(&mut self, rank: Rank, now: Instant) {
        let r = rank as usize;
        self.member[r] = true;
        if self.started {
            self.clock[r] = self.min;
            self.base[r] = self.min;
            self.waiting[r] = true;
            self.release(now);
        } else if self.member.iter().all(|&m| m) {
            self.started = true;
            self.waiting.iter_mut().for_each(|w| *w = true);
            self.release(now);
        }
    }

    /// Worker `rank` left: it no longer holds the slowest clock back, so held reads may go.
    fn on_leave(&mut self, rank: Rank, now: Instant) {
        let r = rank as usize;
        self.member[r] = false;
        self.waiting[r] = false;
        self.held_since[r] = None;
        self.update_min();
        self.release(now);
    }

    /// Worker `rank` pushed at its clock `clock` (its own numbering): applied at once, and its
    /// read at the next clock served when the bound allows.
    fn on_push(&mut self, rank: Rank, clock: Clock, now: Instant) -> Result<(), SyncError> {
        let r = rank as usize;
        if !self.member[r] {
            return Err(SyncError::NotMember { rank });
        }
        if !self.started {
            return Err(SyncError::NotStarted { rank });
        }
        if self.waiting[r] {
            return Err(SyncError::ReadPending {
                rank,
                clock: self.clock[r],
            });
        }
        let expected = self.clock[r];
        if clock.checked_add(self.base[r]) != Some(expected) {
            return Err(SyncError::WrongClock {
                rank,
                clock,
                expected: expected - self.base[r],
            });
        }
        let clock = expected;
        debug_assert!(self.allowed(clock), "a served read broke the bound");
        self.actions.push_back(Action::Apply { rank, clock });
        self.applied += 1;
        self.clock[r] = clock + 1;
        self.waiting[r] = true;
        self.held_since[r] = Some(now);
        self.update_min();
        self.release(now);
        Ok(())
    }

    /// No timers: reads wait for pushes, not for time.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    fn handle_timeout(&mut self, _now: Instant) {}

    fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Pushes applied: the round stamp of the model.
    fn round(&self) -> Clock {
        self.applied
    }

    /// The slowest member's clock.
    fn min_clock(&self) -> Clock {
        self.min
    }

    fn started(&self) -> bool {
        self.started
    }

    fn members(&self) -> usize {
        self.member.iter().filter(|&&m| m).count()
    }

    /// Members at their clocks; others at the slowest member's, where they would rejoin.
    fn clocks(&self) -> Vec<Clock> {
        (0..self.member.len())
            .map(|w| {
                if self.member[w] {
                    self.clock[w]
                } else {
                    self.min
                }
            })
            .collect()
    }

    /// Continues with `round` pushes applied and each worker at its saved clock (in its own
    /// numbering, 0 again): no push the model holds is asked for twice.
    fn resume(&mut self, round: Clock, clocks: &[Clock]) {
        self.applied = round;
        self.clock.copy_from_slice(clocks);
        self.base.copy_from_slice(clocks);
        self.min = clocks.iter().copied().min().unwrap_or(0);
    }

    /// Starts with the workers present: each reads at clock 0.
    fn start(&mut self, now: Instant) {
        if self.started || !self.member.contains(&true) {
            return;
        }
        self.started = true;
        for w in 0..self.member.len() {
            self.waiting[w] = self.member[w];
        }
        self.release(now);
    }

    /// The slowest workers while reads are held for them, each since the later of the oldest
    /// held read and when it was last served.
    fn awaited(&self) -> Vec<(Rank, Instant)> {
        let Some(held) = self.held_since.iter().flatten().min().copied() else {
            return Vec::new();
        };
        (0..self.member.len())
            .filter(|&w| self.member[w] && !self.waiting[w] && self.clock[w] == self.min)
            .map(|w| (w as Rank, self.served_at[w].map_or(held, |t| t.max(held))))
            .collect()
    }
}
