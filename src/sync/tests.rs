//! The barrier against thousands of random schedules on a fake clock: simulated workers with
//! random compute times, stragglers, departures and rejoins, checked against the policy's rules
//! after every action. The vector clock's are in `clock_tests.rs`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::*;

pub(super) struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, so a failing seed replays.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The worker finished computing on the model of this round and pushes.
    Push(u32, u64),
    /// The worker reconnects.
    Rejoin(u32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Gone,
    /// Joined (or pushed) and waiting for a model since the given time.
    Waiting(Duration),
    Computing,
}

struct Sim {
    rng: Rng,
    t0: Instant,
    now: Duration,
    barrier: Barrier,
    mode: BarrierMode,
    state: Vec<State>,
    /// Round of the push each worker made that the barrier accepted as current, if pending.
    accepted: Vec<Option<u64>>,
    compute: Vec<Duration>,
    queue: BinaryHeap<Reverse<(Duration, u64, Ev)>>,
    seq: u64,
    rounds: u64,
    first_push: Option<Duration>,
    late: u64,
    adaptive_timeouts: u64,
    adaptive_below_cap: u64,
    skipped: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let workers = 1 + rng.below(6) as usize;
        let mode = match rng.below(3) {
            0 => BarrierMode::Naive,
            1 => BarrierMode::Timeout(Duration::from_millis(1 + rng.below(40))),
            _ => BarrierMode::Adaptive(Duration::from_millis(1 + rng.below(40))),
        };
        let compute = (0..workers)
            .map(|_| {
                let base = 5 + rng.below(30);
                // About one worker in four is a 10x straggler.
                let factor = if rng.below(4) == 0 { 10 } else { 1 };
                Duration::from_millis(base * factor)
            })
            .collect();
        Sim {
            rng,
            t0: Instant::now(),
            now: Duration::ZERO,
            barrier: Barrier::new(mode, workers),
            mode,
            state: vec![State::Gone; workers],
            accepted: vec![None; workers],
            compute,
            queue: BinaryHeap::new(),
            seq: 0,
            rounds: 0,
            first_push: None,
            late: 0,
            adaptive_timeouts: 0,
            adaptive_below_cap: 0,
            skipped: 0,
        }
    }

    fn at(&self) -> Instant {
        self.t0 + self.now
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, ev)));
    }

    fn jitter(&mut self, w: usize) -> Duration {
        self.compute[w] + Duration::from_micros(self.rng.below(3000))
    }

    fn members(&self) -> Vec<u32> {
        (0..self.state.len())
            .filter(|&w| self.state[w] != State::Gone)
            .map(|w| w as u32)
            .collect()
    }

    fn drain(&mut self) {
        while let Some(a) = self.barrier.poll_action() {
            match a {
                Action::CloseRound {
                    round,
                    participants,
                    missing,
                    cause,
                } => {
                    assert_eq!(round, self.rounds, "rounds close in order");
                    self.rounds += 1;
                    assert!(!participants.is_empty(), "empty round");
                    assert!(participants.windows(2).all(|p| p[0] < p[1]));
                    for &p in &participants {
                        assert_eq!(
                            self.accepted[p as usize].take(),
                            Some(round),
                            "participant {p} did not push for round {round}"
                        );
                    }
                    assert!(
                        self.accepted.iter().all(Option::is_none),
                        "an accepted push was left out of round {round}"
                    );
                    let members = self.members();
                    assert_eq!(missing, members.len() - participants.len());
                    let first = self.first_push.take().expect("a round closes after a push");
                    match (self.mode, cause) {
                        (_, CloseCause::AllArrived) => assert_eq!(participants, members),
                        (BarrierMode::Naive, CloseCause::Timeout) => {
                            panic!("naive barrier timed out")
                        }
                        (BarrierMode::Timeout(t), CloseCause::Timeout) => {
                            assert!(participants.len() < members.len());
                            assert_eq!(self.now, first + t, "closed off its deadline");
                        }
                        (BarrierMode::Adaptive(cap), CloseCause::SlowSkipped) => {
                            assert!(participants.len() < members.len());
                            assert!(self.now - first <= cap, "adaptive waited past its cap");
                            self.skipped += 1;
                        }
                        (_, CloseCause::SlowSkipped) => panic!("only adaptive skips the slow"),
                        (BarrierMode::Adaptive(cap), CloseCause::Timeout) => {
                            assert!(participants.len() < members.len());
                            assert!(self.now - first <= cap, "adaptive waited past its cap");
                            self.adaptive_timeouts += 1;
                            if self.now - first < cap {
                                self.adaptive_below_cap += 1;
                            }
                        }
                    }
                }
                Action::Serve {
                    rank,
                    clock,
                    min_clock,
                } => {
                    assert_eq!(
                        (clock, min_clock),
                        (self.barrier.round(), self.barrier.round())
                    );
                    let w = rank as usize;
                    let State::Waiting(since) = self.state[w] else {
                        panic!(
                            "served worker {rank} that was not waiting: {:?}",
                            self.state[w]
                        );
                    };
                    if let BarrierMode::Timeout(t) | BarrierMode::Adaptive(t) = self.mode {
                        if self.barrier.started() && since > Duration::ZERO {
                            assert!(
                                self.now - since <= t,
                                "worker {rank} waited past the timeout"
                            );
                        }
                    }
                    self.state[w] = State::Computing;
                    let clock = self.barrier.round();
                    let after = self.jitter(w);
                    self.schedule(after, Ev::Push(rank, clock));
                }
                Action::Apply { .. } => panic!("a barrier applied a single push"),
                Action::Late { rank, clock, round } => {
                    assert!(clock < round);
                    assert_eq!(round, self.barrier.round());
                    assert_eq!(self.state[rank as usize], State::Waiting(self.now));
                    self.late += 1;
                }
            }
        }
    }

    fn run(&mut self, until: Duration) {
        let n = self.state.len();
        for w in 0..n {
            let after = Duration::from_millis(self.rng.below(20));
            self.schedule(after, Ev::Rejoin(w as u32));
        }
        loop {
            let next_ev = self.queue.peek().map(|Reverse((t, _, _))| *t);
            let next_timer = self.barrier.poll_timeout().map(|d| d - self.t0);
            let next = match (next_ev, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a
                    .or(b)
                    .expect("the simulation always has something scheduled"),
            };
            if next > until {
                break;
            }
            assert!(next >= self.now, "time went backwards");
            self.now = next;
            if next_timer == Some(next) {
                self.barrier.handle_timeout(self.at());
                self.drain();
                continue;
            }
            let Reverse((_, _, ev)) = self.queue.pop().expect("peeked");
            match ev {
                Ev::Rejoin(rank) => {
                    self.state[rank as usize] = State::Waiting(Duration::ZERO);
                    self.barrier.on_join(rank, self.at());
                }
                Ev::Push(rank, _) if self.state[rank as usize] == State::Gone => {}
                Ev::Push(rank, clock) => {
                    let w = rank as usize;
                    // Now and then a worker dies instead of pushing, and comes back later.
                    if self.rng.below(40) == 0 {
                        self.state[w] = State::Gone;
                        self.barrier.on_leave(rank, self.at());
                        if self.accepted[w].take().is_some() {
                            panic!("a computing worker had an accepted push");
                        }
                        let after = Duration::from_millis(1 + self.rng.below(100));
                        self.schedule(after, Ev::Rejoin(rank));
                    } else {
                        self.state[w] = State::Waiting(self.now);
                        let current = self.barrier.round();
                        self.barrier.on_push(rank, clock, self.at()).unwrap();
                        if clock == current {
                            self.accepted[w] = Some(clock);
                            self.first_push.get_or_insert(self.now);
                        }
                    }
                }
            }
            self.drain();
        }
    }
}

#[test]
fn random_schedules_obey_the_policy() {
    let (mut rounds, mut late, mut naive, mut timeout, mut adaptive) = (0, 0, 0, 0, 0);
    let (mut adaptive_timeouts, mut adaptive_below_cap, mut skipped) = (0, 0, 0);
    for seed in 0..3000 {
        let mut sim = Sim::new(seed);
        sim.run(Duration::from_secs(2));
        assert!(sim.rounds > 0, "seed {seed}: no round closed in 2 s");
        rounds += sim.rounds;
        late += sim.late;
        adaptive_timeouts += sim.adaptive_timeouts;
        adaptive_below_cap += sim.adaptive_below_cap;
        skipped += sim.skipped;
        match sim.mode {
            BarrierMode::Naive => naive += 1,
            BarrierMode::Timeout(_) => timeout += 1,
            BarrierMode::Adaptive(_) => adaptive += 1,
        }
    }
    // The schedules exercised every policy and the late path, and the adaptive timeout learnt
    // to close rounds before its cap.
    assert!(naive > 100 && timeout > 100 && adaptive > 100 && late > 100 && rounds > 10_000);
    assert!(
        adaptive_below_cap > adaptive_timeouts / 4,
        "{adaptive_below_cap} of {adaptive_timeouts}"
    );
    assert!(
        skipped > 1000,
        "adaptive never stopped waiting for a slow worker: {skipped}"
    );
}

fn t(ms: u64) -> Instant {
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t0| *t0 + Duration::from_millis(ms))
}

fn actions(b: &mut Barrier) -> Vec<Action> {
    std::iter::from_fn(|| b.poll_action()).collect()
}

#[test]
fn nobody_gets_the_model_until_everyone_joined() {
    let mut b = Barrier::new(BarrierMode::Naive, 3);
    b.on_join(0, t(0));
    b.on_join(2, t(1));
    assert!(actions(&mut b).is_empty());
    assert_eq!(
        b.on_push(0, 0, t(2)),
        Err(SyncError::NotStarted { rank: 0 })
    );
    b.on_join(1, t(3));
    assert_eq!(
        actions(&mut b),
        (0..3)
            .map(|rank| Action::Serve {
                rank,
                clock: 0,
                min_clock: 0
            })
            .collect::<Vec<_>>()
    );
}

#[test]
fn timeout_closes_with_whoever_arrived_and_late_pushes_rejoin() {
    let mut b = Barrier::new(BarrierMode::Timeout(Duration::from_millis(5)), 3);
    (0..3).for_each(|r| b.on_join(r, t(0)));
    let _ = actions(&mut b);
    b.on_push(1, 0, t(10)).unwrap();
    b.on_push(0, 0, t(12)).unwrap();
    assert_eq!(b.poll_timeout(), Some(t(15)));
    b.handle_timeout(t(14));
    assert!(actions(&mut b).is_empty());
    b.handle_timeout(t(15));
    assert_eq!(
        actions(&mut b),
        vec![
            Action::CloseRound {
                round: 0,
                participants: vec![0, 1],
                missing: 1,
                cause: CloseCause::Timeout
            },
            Action::Serve {
                rank: 0,
                clock: 1,
                min_clock: 1
            },
            Action::Serve {
                rank: 1,
                clock: 1,
                min_clock: 1
            },
        ]
    );
    // The straggler's gradient for round 0 is late (folded or dropped by the server), and it
    // gets the model of round 1.
    b.on_push(2, 0, t(40)).unwrap();
    assert_eq!(
        actions(&mut b),
        vec![
            Action::Late {
                rank: 2,
                clock: 0,
                round: 1
            },
            Action::Serve {
                rank: 2,
                clock: 1,
                min_clock: 1
            }
        ]
    );
    assert_eq!(b.poll_timeout(), None);
}

#[test]
fn naive_waits_for_the_straggler_forever_but_not_for_the_departed() {
    let mut b = Barrier::new(BarrierMode::Naive, 2);
    (0..2).for_each(|r| b.on_join(r, t(0)));
    let _ = actions(&mut b);
    b.on_push(0, 0, t(1)).unwrap();
    b.handle_timeout(t(1_000_000));
    assert!(actions(&mut b).is_empty());
    assert_eq!(b.poll_timeout(), None);
    b.on_leave(1, t(1_000_001));
    assert!(matches!(
        actions(&mut b)[0],
        Action::CloseRound {
            round: 0,
            missing: 0,
            cause: CloseCause::AllArrived,
            ..
        }
    ));
}

#[test]
fn impossible_pushes_are_errors() {
    let mut b = Barrier::new(BarrierMode::Naive, 2);
    assert_eq!(b.on_push(0, 0, t(0)), Err(SyncError::NotMember { rank: 0 }));
    (0..2).for_each(|r| b.on_join(r, t(0)));
    assert_eq!(
        b.on_push(0, 1, t(0)),
        Err(SyncError::FromTheFuture {
            rank: 0,
            clock: 1,
            round: 0
        })
    );
    b.on_push(0, 0, t(0)).unwrap();
    assert_eq!(
        b.on_push(0, 0, t(0)),
        Err(SyncError::Duplicate { rank: 0, round: 0 })
    );
}

#[test]
fn start_goes_on_with_the_workers_present_and_awaited_names_the_missing() {
    let mut b = Barrier::new(BarrierMode::Naive, 3);
    b.on_join(0, t(0));
    b.on_join(2, t(0));
    b.start(t(1));
    let served: Vec<Action> = actions(&mut b);
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(b.started() && b.awaited().is_empty());
    b.on_push(0, 0, t(5)).unwrap();
    assert_eq!(b.awaited(), vec![(2, t(5))]);
    b.on_join(1, t(6)); // late: gets the current model, and is awaited too
    let _ = actions(&mut b);
    // A late joiner is awaited only from when it got the model.
    assert_eq!(b.awaited(), vec![(1, t(6)), (2, t(5))]);
    b.on_leave(1, t(7));
    b.on_push(2, 0, t(8)).unwrap();
    assert!(matches!(
        actions(&mut b)[0],
        Action::CloseRound { round: 0, .. }
    ));
    assert!(b.awaited().is_empty());
}

#[test]
fn every_policy_is_found_by_its_name_and_no_other_name_is() {
    let t = Duration::from_millis(7);
    for name in ["naive", "timeout", "adaptive", "bsp", "ssp", "asp"] {
        let mode = SyncMode::named(name, t, 3).unwrap();
        assert_eq!(mode.name(), name);
    }
    assert_eq!(
        SyncMode::named("ssp", t, 5),
        Some(SyncMode::Clocks(Some(5)))
    );
    assert_eq!(
        SyncMode::named("timeout", t, 5),
        Some(SyncMode::Barrier(BarrierMode::Timeout(t)))
    );
    assert_eq!(SyncMode::named("SSP", t, 3), None);
    assert_eq!(SyncMode::named("", t, 3), None);
}
