//! The adaptive timeout: how long a barrier round waits after its first push, learnt from when
//! the pushes of recent rounds arrived.
//!
//! For each of the last [`WINDOW`] rounds it keeps the *spread*: how long after the round's first
//! push its last push arrived, counting only pushes that came within the cap (a push later than
//! the cap would not have been waited for even by the static timeout, so it says nothing about
//! how long to wait). Late pushes count too: a gradient that missed its round by a little raises
//! that round's spread, so a worker that speeds up again is waited for again. The timeout is
//! `1.25 x` the 90th percentile of the spreads plus [`SLACK`], kept between [`FLOOR`] (or the cap,
//! when that is smaller) and the cap. It starts at the cap.
//!
//! A persistently slow worker's pushes arrive far beyond the cap: the spreads are those of the
//! fast workers, and the timeout shrinks to what they need. Better still, such a worker is not
//! waited for at all: after [`WRITE_OFF`] pushes in a row that came later than the cap after
//! their round's first push, it is *written off*, and a round closes as soon as every worker
//! that is not written off has pushed. Its next push that arrives within the cap (on time, or
//! late by less than the cap) makes it expected again. Pure: fed with `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Clock;

/// Rounds remembered.
pub const WINDOW: usize = 20;
/// The smallest timeout (unless the cap is smaller).
pub const FLOOR: Duration = Duration::from_millis(1);
/// Pushes in a row later than the cap after which a worker is no longer waited for.
pub const WRITE_OFF: u32 = 2;
/// Added to the scaled percentile, so a spread of 0 (one worker on time) still leaves room for
/// jitter.
pub const SLACK: Duration = Duration::from_micros(500);

#[derive(Debug, Clone, Copy)]
struct Spread {
    round: Clock,
    first: Instant,
    spread: Duration,
}

/// A learnt timeout for one barrier: 1.25 x the 90th percentile of the last rounds' spreads
/// plus 0.5 ms, between 1 ms and the cap, and the workers written off as persistently slow.
#[derive(Debug, Clone)]
pub struct AdaptiveTimeout {
    cap: Duration,
    rounds: VecDeque<Spread>,
    /// Per worker, its pushes in a row that came later than the cap.
    misses: Vec<u32>,
}

impl AdaptiveTimeout {
    /// Starts at `cap`, and never exceeds it, for `workers` workers (all expected).
    pub fn new(cap: Duration, workers: usize) -> Self {
        Self {
            cap,
            rounds: VecDeque::with_capacity(WINDOW + 1),
            misses: vec![0; workers],
        }
    }

    /// Whether a round waits for worker `rank` (it has not been written off as persistently
    /// slow).
    pub fn expected(&self, rank: usize) -> bool {
        self.misses[rank] < WRITE_OFF
    }

    /// Worker `rank` left; whoever takes its rank is expected.
    pub fn forget(&mut self, rank: usize) {
        self.misses[rank] = 0;
    }

    /// The cap (and starting value).
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// Round `round` got its first push at `now`.
    pub fn first_push(&mut self, round: Clock, now: Instant) {
        self.rounds.push_back(Spread {
            round,
            first: now,
            spread: Duration::ZERO,
        });
        if self.rounds.len() > WINDOW + 1 {
            self.rounds.pop_front();
        }
    }

    /// Worker `rank`'s push computed on the model of round `round` arrived at `now` (on time
    /// or late). `on_time`: its round is still open (the first push of a round counts as on
    /// time; call [`first_push`](Self::first_push) before).
    pub fn arrival(&mut self, rank: usize, round: Clock, now: Instant, on_time: bool) {
        let cap = self.cap;
        let within = match self.rounds.iter_mut().rev().find(|r| r.round == round) {
            Some(r) => {
                let gap = now.saturating_duration_since(r.first);
                if gap <= cap {
                    r.spread = r.spread.max(gap);
                }
                gap <= cap
            }
            // A round too old to remember: far beyond the cap (unless it is open and unpushed).
            None => on_time,
        };
        if within {
            self.misses[rank] = 0;
        } else {
            self.misses[rank] = self.misses[rank].saturating_add(1);
        }
    }

    /// The timeout for the round that opens now (learnt from the rounds before it).
    pub fn timeout(&self) -> Duration {
        let floor = FLOOR.min(self.cap);
        // The last entry is the round just opened, when `first_push` came first.
        let mut spreads: Vec<Duration> = self.rounds.iter().map(|r| r.spread).collect();
        if spreads.len() <= 1 {
            return self.cap;
        }
        spreads.pop();
        spreads.sort_unstable();
        let q90 = spreads[(spreads.len() * 9).div_ceil(10) - 1];
        (q90 * 5 / 4 + SLACK).clamp(floor, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1e3)
    }

    /// Runs `rounds` rounds 20 ms apart in which worker 0 pushes first and worker `1 + i`
    /// `gaps[i]` after it.
    fn rounds(a: &mut AdaptiveTimeout, t0: Instant, from: Clock, n: Clock, gaps: &[f64]) {
        for r in from..from + n {
            let first = t0 + ms(20.0 * r as f64);
            a.first_push(r, first);
            a.arrival(0, r, first, true);
            for (i, &g) in gaps.iter().enumerate() {
                a.arrival(1 + i, r, first + ms(g), g <= 20.0);
            }
        }
    }

    #[test]
    fn starts_at_the_cap_and_learns_what_the_on_time_workers_need() {
        let t0 = Instant::now();
        let mut a = AdaptiveTimeout::new(ms(20.0), 4);
        assert_eq!(a.timeout(), ms(20.0));
        rounds(&mut a, t0, 0, 30, &[0.2, 0.4, 2.0]);
        // 1.25 x 2 ms + 0.5 ms.
        assert_eq!(a.timeout(), ms(3.0));
    }

    #[test]
    fn stops_waiting_for_a_persistent_straggler_and_waits_again_once_it_speeds_up() {
        let t0 = Instant::now();
        let mut a = AdaptiveTimeout::new(ms(20.0), 4);
        // Two fast workers 0.4 ms apart; the straggler (worker 2) 180 ms after: beyond the cap.
        rounds(&mut a, t0, 0, 1, &[0.4, 180.0]);
        assert!(a.expected(2), "one slow push does not write a worker off");
        rounds(&mut a, t0, 1, 29, &[0.4, 180.0]);
        assert!(!a.expected(2) && a.expected(1) && a.expected(0));
        assert_eq!(a.timeout(), FLOOR);
        // It speeds up but is out of phase: it arrives 8 ms after the others' first push.
        rounds(&mut a, t0, 30, 5, &[0.4, 8.0]);
        assert!(a.expected(2), "waited for again");
        assert_eq!(
            a.timeout(),
            ms(10.5),
            "1.25 x 8 ms + 0.5 ms covers it again"
        );
        rounds(&mut a, t0, 35, 2, &[0.4, 180.0]);
        assert!(!a.expected(2));
        a.forget(2);
        assert!(a.expected(2), "a new worker on the rank is expected");
    }

    #[test]
    fn a_late_push_within_the_cap_raises_its_round_and_a_single_outlier_does_not() {
        let t0 = Instant::now();
        let mut a = AdaptiveTimeout::new(ms(50.0), 4);
        rounds(&mut a, t0, 0, 20, &[1.0]);
        assert_eq!(a.timeout(), ms(1.75));
        // Round 19 closed long ago; its straggler arrives 30 ms after its first push.
        a.arrival(2, 19, t0 + ms(20.0 * 19.0 + 30.0), false);
        a.first_push(20, t0 + ms(400.0));
        assert_eq!(
            a.timeout(),
            ms(1.75),
            "one round in twenty is under the 90th percentile"
        );
        a.arrival(2, 18, t0 + ms(20.0 * 18.0 + 30.0), false);
        a.arrival(2, 17, t0 + ms(20.0 * 17.0 + 30.0), false);
        assert_eq!(a.timeout(), ms(38.0));
    }

    #[test]
    fn never_exceeds_a_small_cap() {
        let t0 = Instant::now();
        let mut a = AdaptiveTimeout::new(ms(0.3), 4);
        rounds(&mut a, t0, 0, 30, &[0.0]);
        assert_eq!(a.timeout(), ms(0.3));
    }
}
