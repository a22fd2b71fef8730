//! The job's tensors as the server synchronises them: one policy instance per part, their timers,
//! the job's progress (the slowest part's rounds or clock, what `--rounds` counts), and the
//! bookkeeping that turns part rounds back into key rounds for the trace and the progress line
//! (which speak of keys, not parts).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Instant;

use hetsync_transport::protocol::Parts;

use crate::sync::{CloseCause, Policy, SyncMode};
use crate::{Clock, Key, Rank};

/// A key's round, complete once every part of the key has closed it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeyRound {
    /// The tensor.
    pub key: u32,
    /// The round.
    pub round: Clock,
    /// Workers whose gradient is in every part of this round, ascending.
    pub participants: Vec<Rank>,
    /// Workers whose gradient is in some parts only, with those parts' indices in the tensor.
    pub partial: Vec<(Rank, Vec<u32>)>,
    /// Workers in the job whose gradient missed at least one part of the key.
    pub missing: usize,
    /// `Timeout` if any part closed by timeout, else `SlowSkipped` if any part closed without
    /// its written-off workers, else `AllArrived`.
    pub cause: CloseCause,
    /// Late gradients folded into this round.
    pub folded: Vec<Folded>,
}

/// A late gradient folded into a key round.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Folded {
    /// Its worker.
    pub rank: Rank,
    /// The round it was computed on.
    pub clock: Clock,
    /// Its weight, `1 / (1 + rounds late)`.
    pub weight: f32,
    /// The parts (indices in the tensor) it was folded into in this round; empty when the
    /// tensor is one part.
    pub parts: Vec<u32>,
}

/// One key round being assembled from its parts' closes.
#[derive(Debug, Default)]
struct Assembly {
    parts_closed: u32,
    /// For each worker, the parts (index in the tensor) its gradient is in.
    seen: BTreeMap<Rank, Vec<u32>>,
    /// Workers in the job when a part closed (participants plus missing), at most.
    members: usize,
    timeout: bool,
    skipped: bool,
    folded: Vec<Folded>,
}

#[derive(Debug)]
struct KeyState {
    parts: u32,
    /// Key rounds complete.
    closed: Clock,
    /// Rounds `closed`, `closed + 1`, ... being assembled.
    open: VecDeque<Assembly>,
}

/// Every part's policy and timer, and every key's rounds. See the [module documentation](self).
#[derive(Debug)]
pub(crate) struct Tensors {
    parts: Parts,
    policies: Vec<Box<dyn Policy>>,
    /// Deadlines asked for by the policies, soonest first; entries a policy no longer asks for
    /// are skipped when they come up.
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    armed: Vec<Option<Instant>>,
    keys: Vec<KeyState>,
    /// Each part's policy's `min_clock` when last looked at.
    part_min: Vec<Clock>,
    /// The smallest of `part_min`: rounds (or clocks) every part and every worker has completed.
    job_rounds: Clock,
    /// Parts whose `part_min` equals `job_rounds`.
    at_job_round: usize,
}

impl Tensors {
    /// One `mode` policy for each of `parts`, for `workers` workers.
    pub fn new(parts: Parts, mode: SyncMode, workers: usize) -> Self {
        let policies: Vec<Box<dyn Policy>> =
            (0..parts.len()).map(|_| mode.policy(workers)).collect();
        let keys: Vec<KeyState> = (0..parts.dims().len())
            .map(|t| KeyState {
                parts: parts.of_tensor(t).len() as u32,
                closed: 0,
                open: VecDeque::new(),
            })
            .collect();
        Self {
            armed: vec![None; parts.len()],
            part_min: vec![0; parts.len()],
            at_job_round: parts.len(),
            keys,
            policies,
            timers: BinaryHeap::new(),
            job_rounds: 0,
            parts,
        }
    }

    /// Part `key`'s policy.
    pub fn policy(&mut self, key: Key) -> &mut dyn Policy {
        self.policies[key as usize].as_mut()
    }

    /// Number of parts.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether training has started (every worker joined once).
    pub fn started(&self) -> bool {
        self.policies[0].started()
    }

    /// Workers in the job now.
    pub fn members(&self) -> usize {
        self.policies[0].members()
    }

    /// Rounds (barrier) or clocks (vector clock) every part and every worker has completed: the
    /// job's steps, what `--rounds` counts.
    pub fn job_rounds(&self) -> Clock {
        self.job_rounds
    }

    /// Looks at part `key`'s progress after its policy was fed something.
    pub fn progressed(&mut self, key: Key) {
        let k = key as usize;
        let m = self.policies[k].min_clock();
        if m <= self.part_min[k] {
            return;
        }
        if self.part_min[k] == self.job_rounds {
            self.at_job_round -= 1;
        }
        self.part_min[k] = m;
        if self.at_job_round == 0 {
            self.job_rounds = *self.part_min.iter().min().expect("at least one part");
            let r = self.job_rounds;
            self.at_job_round = self.part_min.iter().filter(|&&p| p == r).count();
        }
    }

    /// The part's index within its tensor, and whether the tensor has more than one part.
    pub fn part_of(&self, key: Key) -> (u32, u32, bool) {
        let p = self.parts[key];
        (p.tensor, p.index, self.keys[p.tensor as usize].parts > 1)
    }

    /// Records part `key`'s timer after the policy has been fed something.
    pub fn rearm(&mut self, key: Key) {
        let t = self.policies[key as usize].poll_timeout();
        if t != self.armed[key as usize] {
            self.armed[key as usize] = t;
            if let Some(t) = t {
                self.timers.push(Reverse((t, key)));
            }
        }
    }

    /// The soonest deadline any policy asked for.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if self.armed[key as usize] == Some(t) {
                return Some(t);
            }
            self.timers.pop();
        }
        None
    }

    /// The parts whose timer `now` has reached (their timers are disarmed: fire each with
    /// `handle_timeout`, then [`rearm`](Self::rearm)).
    pub fn expired(&mut self, now: Instant, out: &mut Vec<Key>) {
        while let Some(&Reverse((t, key))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.armed[key as usize] == Some(t) {
                self.armed[key as usize] = None;
                out.push(key);
            }
        }
    }

    /// Continues key rounds from a checkpoint whose parts were at `rounds`: each key has
    /// completed its slowest part's rounds, and the rounds its faster parts closed beyond that
    /// are counted as closed by them (without participants: they were before the restart).
    pub fn resume(&mut self, rounds: &[Clock]) {
        for (t, k) in self.keys.iter_mut().enumerate() {
            let mine: Vec<Clock> = self
                .parts
                .of_tensor(t)
                .map(|p| rounds[p as usize])
                .collect();
            k.closed = mine.iter().copied().min().unwrap_or(0);
            k.open.clear();
            for &r in &mine {
                for at in 0..(r - k.closed) as usize {
                    while k.open.len() <= at {
                        k.open.push_back(Assembly::default());
                    }
                    k.open[at].parts_closed += 1;
                }
            }
        }
    }

    /// Part `key` closed `round` with `participants` (`missing` workers left out) because of
    /// `cause`, with the late gradients `folded` in. Returns the key round this completes, if
    /// any (key rounds complete in order).
    pub fn part_closed(
        &mut self,
        key: Key,
        round: Clock,
        participants: &[Rank],
        missing: usize,
        cause: CloseCause,
        folded: Vec<(Rank, Clock, f32)>,
    ) -> Option<KeyRound> {
        let part = self.parts[key];
        let k = &mut self.keys[part.tensor as usize];
        let at = usize::try_from(round - k.closed).expect("rounds close in order");
        while k.open.len() <= at {
            k.open.push_back(Assembly::default());
        }
        let a = &mut k.open[at];
        a.parts_closed += 1;
        a.members = a.members.max(participants.len() + missing);
        a.timeout |= cause == CloseCause::Timeout;
        a.skipped |= cause == CloseCause::SlowSkipped;
        for (rank, clock, weight) in folded {
            let same = |f: &&mut Folded| f.rank == rank && f.clock == clock && f.weight == weight;
            match a.folded.iter_mut().find(same) {
                Some(f) => f.parts.push(part.index),
                None => a.folded.push(Folded {
                    rank,
                    clock,
                    weight,
                    parts: vec![part.index],
                }),
            }
        }
        for &r in participants {
            a.seen.entry(r).or_default().push(part.index);
        }
        if at != 0 || a.parts_closed < k.parts {
            return None;
        }
        let a = k.open.pop_front().expect("the round being completed");
        let (all, some): (Vec<_>, Vec<_>) = a
            .seen
            .into_iter()
            .partition(|(_, ps)| ps.len() == k.parts as usize);
        let participants: Vec<Rank> = all.into_iter().map(|(r, _)| r).collect();
        let done = KeyRound {
            key: part.tensor,
            round,
            missing: a.members.saturating_sub(participants.len()),
            participants,
            partial: some,
            cause: if a.timeout {
                CloseCause::Timeout
            } else if a.skipped {
                CloseCause::SlowSkipped
            } else {
                CloseCause::AllArrived
            },
            folded: a
                .folded
                .into_iter()
                .map(|mut f| {
                    if k.parts == 1 {
                        f.parts.clear();
                    }
                    f
                })
                .collect(),
        };
        k.closed += 1;
        Some(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rounds_complete_when_every_part_closed_them_in_order() {
        // Tensor 0 has three parts, tensor 1 one.
        let parts = Parts::new(&[600, 10], 1024).unwrap();
        let mut t = Tensors::new(parts, SyncMode::NAIVE, 2);
        assert_eq!(t.len(), 4);
        assert_eq!(
            t.part_closed(0, 0, &[0, 1], 0, CloseCause::AllArrived, vec![]),
            None
        );
        // Part 1 runs a round ahead of part 2.
        assert_eq!(
            t.part_closed(1, 0, &[0], 1, CloseCause::Timeout, vec![]),
            None
        );
        assert_eq!(
            t.part_closed(1, 1, &[0, 1], 0, CloseCause::AllArrived, vec![]),
            None
        );
        assert_eq!(
            t.part_closed(3, 0, &[0, 1], 0, CloseCause::AllArrived, vec![])
                .map(|k| k.key),
            Some(1)
        );
        let done = t
            .part_closed(2, 0, &[0, 1], 0, CloseCause::AllArrived, vec![])
            .unwrap();
        assert_eq!(done.round, 0);
        assert_eq!(done.participants, vec![0]);
        assert_eq!(done.partial, vec![(1, vec![0, 2])]);
        assert_eq!(done.missing, 1);
        assert_eq!(done.cause, CloseCause::Timeout);
    }

    #[test]
    fn a_worker_missing_any_part_counts_as_missing_from_the_key_round() {
        // 4 workers; part 0 has {0, 1}, part 1 has {0, 2}: workers 1, 2 and 3 each missed a part.
        let mut t = Tensors::new(Parts::new(&[300], 1024).unwrap(), SyncMode::NAIVE, 4);
        assert_eq!(
            t.part_closed(0, 0, &[0, 1], 2, CloseCause::Timeout, vec![]),
            None
        );
        let done = t
            .part_closed(1, 0, &[0, 2], 2, CloseCause::Timeout, vec![])
            .unwrap();
        assert_eq!(done.participants, vec![0]);
        assert_eq!(done.missing, 3);
    }

    #[test]
    fn key_rounds_go_on_after_a_resume_with_parts_at_different_rounds() {
        // Tensor 0 has three parts, at rounds 1000, 1001 and 1000 in the checkpoint: part 1
        // had closed round 1000 (0-based) already, the others had not.
        let mut t = Tensors::new(Parts::new(&[600], 1024).unwrap(), SyncMode::NAIVE, 1);
        t.resume(&[1000, 1001, 1000]);
        assert_eq!(
            t.part_closed(0, 1000, &[0], 0, CloseCause::AllArrived, vec![]),
            None
        );
        let done = t.part_closed(2, 1000, &[0], 0, CloseCause::AllArrived, vec![]);
        assert_eq!(
            done.map(|k| k.round),
            Some(1000),
            "part 1 closed 1000 before the crash"
        );
        // Then every part closes 1001 and the key round completes: nothing piles up.
        for p in 0..3 {
            let r = t.part_closed(p, 1001, &[0], 0, CloseCause::AllArrived, vec![]);
            assert_eq!(r.map(|k| k.round), (p == 2).then_some(1001));
        }
        assert!(t.keys[0].open.is_empty());
    }

    #[test]
    fn the_job_is_as_far_as_its_slowest_part() {
        use std::time::Instant;
        let now = Instant::now();
        let mut t = Tensors::new(Parts::new(&[600, 10], 1024).unwrap(), SyncMode::NAIVE, 1);
        for key in 0..4 {
            t.policy(key).on_join(0, now);
            while t.policy(key).poll_action().is_some() {}
        }
        for round in 0..3 {
            // Part 2 lags a round behind the others.
            for key in [0, 1, 3].into_iter().chain((round > 0).then_some(2)) {
                let clock = t.policy(key).round();
                t.policy(key).on_push(0, clock, now).unwrap();
                while t.policy(key).poll_action().is_some() {}
                t.progressed(key);
            }
            assert_eq!(t.job_rounds(), round, "part 2 has closed {round} rounds");
        }
    }
}
