//! The vector clock against random schedules on a fake clock: workers with transient stragglers
//! (each step 10x slower now and then), departures and rejoins, and a real model (the quadratic
//! objective, updated with the engine's SGD) so BSP can be compared with the naive barrier.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::tests::Rng;
use super::*;
use crate::engine::{Kernel, Sgd};
use crate::{Clock, Rank};

const DIM: usize = 8;
const LR: f32 = 0.3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The worker (in its `gen`-th life) finished computing and pushes.
    Push(u32, u32),
    /// The worker connects again.
    Rejoin(u32),
}

struct Run {
    rng: Rng,
    t0: Instant,
    now: Duration,
    policy: Box<dyn Policy>,
    mode: SyncMode,
    member: Vec<bool>,
    gen: Vec<u32>,
    /// Per worker: the clock of its read (vector clock: its completed clocks in the job's
    /// numbering; barrier: the round of the model it has).
    next: Vec<Clock>,
    /// What the worker's own clock numbering is offset by (it restarts at 0 on a rejoin).
    base: Vec<Clock>,
    waiting_since: Vec<Option<Duration>>,
    /// The wait is a read after a push (not the first read after joining).
    pending_read: Vec<bool>,
    read: Vec<Vec<f32>>,
    pending: Vec<Option<Vec<f32>>>,
    targets: Vec<Vec<f32>>,
    model: Vec<f32>,
    compute: Vec<Duration>,
    pushes_left: Vec<u64>,
    departures: bool,
    queue: BinaryHeap<Reverse<(Duration, u64, Ev)>>,
    seq: u64,
    // What the run saw.
    served: u64,
    held: u64,
    most_ahead: u64,
    rounds: u64,
}

/// The longest step: a 10x straggler's slowest compute plus jitter.
const MAX_STEP: Duration = Duration::from_millis(10 * 35 + 3);

impl Run {
    fn new(seed: u64, mode: SyncMode, workers: usize, pushes: u64, departures: bool) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let compute = (0..workers)
            .map(|_| Duration::from_millis(5 + rng.below(30)))
            .collect();
        let targets = (0..workers)
            .map(|_| {
                (0..DIM)
                    .map(|_| rng.below(2001) as f32 / 1000.0 - 1.0)
                    .collect()
            })
            .collect();
        Run {
            rng,
            t0: Instant::now(),
            now: Duration::ZERO,
            policy: mode.policy(workers),
            mode,
            member: vec![false; workers],
            gen: vec![0; workers],
            next: vec![0; workers],
            base: vec![0; workers],
            waiting_since: vec![None; workers],
            pending_read: vec![false; workers],
            read: vec![vec![0.0; DIM]; workers],
            pending: vec![None; workers],
            targets,
            model: vec![0.0; DIM],
            compute,
            pushes_left: vec![pushes; workers],
            departures,
            queue: BinaryHeap::new(),
            seq: 0,
            served: 0,
            held: 0,
            most_ahead: 0,
            rounds: 0,
        }
    }

    fn staleness(&self) -> Option<u64> {
        match self.mode {
            SyncMode::Clocks(n) => n,
            SyncMode::Barrier(_) => Some(0),
        }
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, ev)));
    }

    /// The longest a read may wait: until every worker at the slowest clock has pushed once
    /// more, one step. A worker that dies and comes back restarts at the slowest clock and
    /// holds it for one more step (after up to 100 ms away); a few of those may chain.
    fn max_wait(&self) -> Duration {
        if self.departures {
            3 * (MAX_STEP + Duration::from_millis(101))
        } else {
            MAX_STEP
        }
    }

    fn true_min(&self) -> Option<Clock> {
        (0..self.member.len())
            .filter(|&w| self.member[w])
            .map(|w| self.next[w])
            .min()
    }

    fn step_time(&mut self, w: usize) -> Duration {
        // Transient stragglers: one step in four is 10x slower.
        let factor = if self.rng.below(4) == 0 { 10 } else { 1 };
        self.compute[w] * factor + Duration::from_micros(self.rng.below(3000))
    }

    fn drain(&mut self) {
        let sgd = Sgd { lr: LR };
        let workers = self.member.len() as f32;
        while let Some(a) = self.policy.poll_action() {
            match a {
                Action::Serve {
                    rank,
                    clock,
                    min_clock,
                } => {
                    let w = rank as usize;
                    let after_push = std::mem::take(&mut self.pending_read[w]);
                    let since = self.waiting_since[w]
                        .take()
                        .unwrap_or_else(|| panic!("served worker {rank}, which was not waiting"));
                    let waited = self.now - since;
                    assert!(waited <= self.max_wait(), "worker {rank} waited {waited:?}");
                    if self.mode.is_clocked() {
                        assert_eq!(clock, self.next[w], "served at the wrong clock");
                        assert_eq!(Some(min_clock), self.true_min(), "wrong slowest clock");
                        if let Some(n) = self.staleness() {
                            assert!(
                                clock <= min_clock + n,
                                "read at {clock}, slowest {min_clock}, bound {n}"
                            );
                        } else if after_push {
                            assert!(waited.is_zero(), "ASP made a read wait");
                        }
                        self.most_ahead = self.most_ahead.max(clock - min_clock);
                    } else {
                        self.next[w] = clock;
                    }
                    if !waited.is_zero() {
                        self.held += 1;
                    }
                    self.served += 1;
                    self.read[w].copy_from_slice(&self.model);
                    if self.pushes_left[w] > 0 {
                        self.pushes_left[w] -= 1;
                        let after = self.step_time(w);
                        self.schedule(after, Ev::Push(rank, self.gen[w]));
                    }
                }
                Action::Apply { rank, clock } => {
                    let w = rank as usize;
                    assert_eq!(clock, self.next[w], "applied out of order");
                    let g = self.pending[w].take().expect("applied a push never made");
                    sgd.step_by(Kernel::best(), &mut self.model, &[&g], workers);
                    self.next[w] += 1;
                }
                Action::CloseRound { participants, .. } => {
                    let grads: Vec<Vec<f32>> = participants
                        .iter()
                        .map(|&p| self.pending[p as usize].take().expect("a pushed gradient"))
                        .collect();
                    let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
                    sgd.step(Kernel::best(), &mut self.model, &refs);
                    self.rounds += 1;
                }
                Action::Late { .. } => {
                    panic!("late push in a schedule without stragglers left behind")
                }
            }
        }
    }

    fn run(&mut self, until: Duration) {
        for w in 0..self.member.len() {
            let after = Duration::from_millis(self.rng.below(20));
            self.schedule(after, Ev::Rejoin(w as u32));
        }
        while let Some(Reverse((t, _, ev))) = self.queue.pop() {
            if t > until {
                break;
            }
            self.now = t;
            let at = self.t0 + self.now;
            match ev {
                Ev::Rejoin(rank) => {
                    let w = rank as usize;
                    self.member[w] = true;
                    self.waiting_since[w] = Some(self.now);
                    self.pending_read[w] = false;
                    self.policy.on_join(rank, at);
                    if self.policy.started() && self.mode.is_clocked() {
                        // It starts at the slowest member's clock, in its own numbering at 0.
                        self.next[w] = self.policy.min_clock();
                        self.base[w] = self.next[w];
                    }
                }
                Ev::Push(rank, gen) if gen != self.gen[rank as usize] => {}
                Ev::Push(rank, _) => {
                    let w = rank as usize;
                    if self.departures && self.rng.below(50) == 0 {
                        self.member[w] = false;
                        self.gen[w] += 1;
                        self.pending[w] = None;
                        self.policy.on_leave(rank, at);
                        let after = Duration::from_millis(1 + self.rng.below(100));
                        self.schedule(after, Ev::Rejoin(rank));
                    } else {
                        let g: Vec<f32> = self.read[w]
                            .iter()
                            .zip(&self.targets[w])
                            .map(|(m, t)| m - t)
                            .collect();
                        self.pending[w] = Some(g);
                        self.waiting_since[w] = Some(self.now);
                        self.pending_read[w] = true;
                        let own = self.next[w] - self.base[w];
                        self.policy.on_push(rank, own, at).unwrap();
                    }
                }
            }
            self.drain();
        }
        // Whoever still waits has not waited longer than one slow step.
        for (w, since) in self.waiting_since.iter().enumerate() {
            if let (true, Some(s)) = (self.member[w], since) {
                assert!(
                    self.now - *s <= self.max_wait(),
                    "worker {w}'s read starves"
                );
            }
        }
    }
}

fn random_staleness(rng: &mut Rng) -> Option<u64> {
    match rng.below(4) {
        0 => Some(0),
        1 => None,
        _ => Some(1 + rng.below(4)),
    }
}

#[test]
fn random_schedules_keep_the_bound_and_never_starve_a_read() {
    let (mut held, mut ahead_by_n, mut asp) = (0, 0, 0);
    for seed in 0..2000 {
        let mut pick = Rng(seed | 1);
        let staleness = random_staleness(&mut pick);
        let workers = 1 + pick.below(6) as usize;
        let departures = seed % 2 == 0;
        let mut run = Run::new(
            seed,
            SyncMode::Clocks(staleness),
            workers,
            u64::MAX,
            departures,
        );
        run.run(Duration::from_secs(2));
        assert!(run.served > workers as u64, "seed {seed}: no progress");
        held += run.held;
        match staleness {
            Some(n) if workers > 1 && run.most_ahead == n => ahead_by_n += 1,
            None => asp += 1,
            _ => {}
        }
    }
    // Reads were held back, fast workers did reach the bound, and ASP was exercised.
    assert!(
        held > 10_000 && ahead_by_n > 500 && asp > 300,
        "{held} {ahead_by_n} {asp}"
    );
}

#[test]
fn bsp_ends_where_the_naive_barrier_does() {
    for seed in 0..300 {
        let workers = 1 + (seed % 6) as usize;
        let rounds = 20 + seed % 30;
        let mut bsp = Run::new(seed, SyncMode::Clocks(Some(0)), workers, rounds, false);
        bsp.run(Duration::MAX);
        let mut naive = Run::new(seed, SyncMode::NAIVE, workers, rounds, false);
        naive.run(Duration::MAX);
        assert_eq!(naive.rounds, rounds);
        assert_eq!(bsp.policy.min_clock(), rounds);
        // Relative to the model's size: single elements near zero lose digits to cancellation.
        let size = naive.model.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (b, n) in bsp.model.iter().zip(&naive.model) {
            assert!(
                (b - n).abs() <= 1e-6 * size,
                "seed {seed}: bsp {b} naive {n} (model size {size})"
            );
        }
        assert!(
            naive.model.iter().any(|&m| m.abs() > 0.01),
            "the model moved"
        );
    }
}

fn t(ms: u64) -> Instant {
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t0| *t0 + Duration::from_millis(ms))
}

fn actions(p: &mut VectorClock) -> Vec<Action> {
    std::iter::from_fn(|| p.poll_action()).collect()
}

fn serve(rank: Rank, clock: Clock, min_clock: Clock) -> Action {
    Action::Serve {
        rank,
        clock,
        min_clock,
    }
}

#[test]
fn ssp_lets_a_fast_worker_run_exactly_n_clocks_ahead() {
    let mut p = VectorClock::new(Some(2), 2);
    p.on_join(0, t(0));
    p.on_join(1, t(0));
    assert_eq!(actions(&mut p), vec![serve(0, 0, 0), serve(1, 0, 0)]);
    for c in 0..2 {
        p.on_push(0, c, t(c)).unwrap();
        assert_eq!(
            actions(&mut p),
            vec![Action::Apply { rank: 0, clock: c }, serve(0, c + 1, 0)]
        );
    }
    // Its read at clock 3 is 3 ahead of worker 1, which has not pushed: held.
    p.on_push(0, 2, t(2)).unwrap();
    assert_eq!(actions(&mut p), vec![Action::Apply { rank: 0, clock: 2 }]);
    assert_eq!(
        p.on_push(0, 3, t(3)),
        Err(SyncError::ReadPending { rank: 0, clock: 3 })
    );
    // Worker 1 completes clock 0: the slowest clock is 1 and the held read goes.
    p.on_push(1, 0, t(4)).unwrap();
    assert_eq!(
        actions(&mut p),
        vec![
            Action::Apply { rank: 1, clock: 0 },
            serve(0, 3, 1),
            serve(1, 1, 1)
        ]
    );
    assert_eq!(p.round(), 4, "every push was applied");
}

#[test]
fn asp_serves_every_read_at_once_and_bsp_waits_for_everyone() {
    let mut asp = VectorClock::new(None, 2);
    let mut bsp = VectorClock::new(Some(0), 2);
    for p in [&mut asp, &mut bsp] {
        p.on_join(0, t(0));
        p.on_join(1, t(0));
        let _ = actions(p);
    }
    for c in 0..50 {
        asp.on_push(0, c, t(c)).unwrap();
        assert_eq!(actions(&mut asp).last(), Some(&serve(0, c + 1, 0)));
    }
    bsp.on_push(0, 0, t(0)).unwrap();
    assert_eq!(actions(&mut bsp), vec![Action::Apply { rank: 0, clock: 0 }]);
    bsp.on_push(1, 0, t(1)).unwrap();
    assert_eq!(actions(&mut bsp)[1..], [serve(0, 1, 1), serve(1, 1, 1)]);
}

#[test]
fn pushes_no_worker_could_make_are_errors() {
    let mut p = VectorClock::new(None, 2);
    assert_eq!(p.on_push(0, 0, t(0)), Err(SyncError::NotMember { rank: 0 }));
    p.on_join(0, t(0));
    assert_eq!(
        p.on_push(0, 0, t(0)),
        Err(SyncError::NotStarted { rank: 0 })
    );
    p.on_join(1, t(0));
    let _ = actions(&mut p);
    // Even without a bound, no clock may be skipped (nor overflow).
    for bad in [1, 2, u64::MAX] {
        assert_eq!(
            p.on_push(0, bad, t(0)),
            Err(SyncError::WrongClock {
                rank: 0,
                clock: bad,
                expected: 0
            })
        );
    }
    p.on_push(0, 0, t(0)).unwrap();
    let _ = actions(&mut p);
    assert_eq!(
        p.on_push(0, 0, t(0)),
        Err(SyncError::WrongClock {
            rank: 0,
            clock: 0,
            expected: 1
        })
    );
    // After a rejoin its own numbering restarts at 0, whatever the job's clock.
    for c in 1..5 {
        p.on_push(0, c, t(c)).unwrap();
    }
    p.on_push(1, 0, t(5)).unwrap();
    p.on_leave(1, t(6));
    p.on_join(1, t(7));
    let _ = actions(&mut p);
    assert_eq!(p.clock_of(1), 5);
    assert!(p.on_push(1, u64::MAX, t(8)).is_err());
    assert!(p.on_push(1, 5, t(8)).is_err());
    p.on_push(1, 0, t(8)).unwrap();
}

#[test]
fn a_departure_releases_held_reads_and_a_rejoin_starts_at_the_slowest_clock() {
    let mut p = VectorClock::new(Some(0), 3);
    (0..3).for_each(|r| p.on_join(r, t(0)));
    let _ = actions(&mut p);
    for c in 0..3 {
        for r in 0..2 {
            p.on_push(r, c, t(c)).unwrap();
        }
        if c == 0 {
            // Worker 2 is slow: reads at clock 1 wait for it; then it dies.
            assert_eq!(actions(&mut p).len(), 2);
            p.on_leave(2, t(1));
            assert_eq!(actions(&mut p), vec![serve(0, 1, 1), serve(1, 1, 1)]);
        } else {
            let _ = actions(&mut p);
        }
    }
    // It comes back at the slowest clock (3) and its own clock 0 means 3.
    p.on_join(2, t(10));
    assert_eq!(actions(&mut p), vec![serve(2, 3, 3)]);
    assert_eq!(p.clock_of(2), 3);
    p.on_push(2, 0, t(11)).unwrap();
    assert_eq!(actions(&mut p), vec![Action::Apply { rank: 2, clock: 3 }]);
}

#[test]
fn start_serves_those_present_and_awaited_names_the_slowest_while_reads_are_held() {
    let mut p = VectorClock::new(Some(0), 3);
    p.on_join(0, t(0));
    p.on_join(1, t(0));
    p.start(t(1));
    assert_eq!(actions(&mut p), vec![serve(0, 0, 0), serve(1, 0, 0)]);
    p.on_push(0, 0, t(2)).unwrap();
    let _ = actions(&mut p);
    assert_eq!(p.awaited(), vec![(1, t(2))]);
    p.on_join(2, t(3));
    assert_eq!(actions(&mut p), vec![serve(2, 0, 0)]);
    // A newcomer is awaited only from when it got its model.
    assert_eq!(p.awaited(), vec![(1, t(2)), (2, t(3))]);
    p.on_push(1, 0, t(4)).unwrap();
    p.on_push(2, 0, t(5)).unwrap();
    let _ = actions(&mut p);
    assert_eq!(p.awaited(), vec![], "no read is held");
}

#[test]
fn a_resume_puts_every_worker_back_at_its_own_clock() {
    let mut p = VectorClock::new(Some(2), 2);
    p.resume(40, &[5, 7]);
    p.on_join(0, t(0));
    p.on_join(1, t(0));
    assert_eq!(actions(&mut p), vec![serve(0, 5, 5), serve(1, 7, 5)]);
    assert_eq!(p.round(), 40);
    // Their own numbering starts at 0 again; worker 1's clock 7 is not asked for twice.
    p.on_push(1, 0, t(1)).unwrap();
    assert_eq!(actions(&mut p), vec![Action::Apply { rank: 1, clock: 7 }]);
    assert_eq!(p.clocks(), vec![5, 8]);
    p.on_push(0, 0, t(2)).unwrap();
    assert_eq!(
        actions(&mut p),
        vec![
            Action::Apply { rank: 0, clock: 5 },
            serve(0, 6, 6),
            serve(1, 8, 6)
        ]
    );
}
