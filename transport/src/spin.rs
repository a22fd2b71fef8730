//! A bounded spin before sleeping, that learns whether it pays.
//!
//! Waking a sleeping thread on another core costs tens of microseconds, more than a whole 4 KiB
//! round trip over loopback; polling for a while first takes a reply that is on its way with no
//! wake-up. But spinning costs a core: wasted when the answer is far off (a worker computing for
//! milliseconds), and harmful when the machine is shared (the spinner takes time from the very
//! process it waits for, and looks CPU-bound to the scheduler). So the spin adapts, like an
//! adaptive mutex: each wait reports how long the answer actually took; a quick answer sets the
//! spin back to the bound, a later one halves it. A job whose answers come
//! quickly keeps spinning; one whose answers come late (long compute, or an overloaded machine,
//! where waits stretch) soon stops, and starts again once answers come quickly.
//!
//! And no one spins on a crowded machine: when more threads are runnable than there are CPUs
//! (the kernel's count in `/proc/loadavg`, read at most every 50 ms per process), a spinner
//! would only take time from the process it waits for, while a sleeper is woken promptly (the
//! scheduler favours it, and no CPU is idle, so no idle exit is paid). The count is the whole
//! host's, held against the CPUs this process may use: in a container limited to fewer CPUs than
//! a busy host has, spinning stays off, which is the safe side.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Below this a spin is not worth a clock read.
const FLOOR: Duration = Duration::from_micros(2);

/// The spin state of one waiting thread (see the module documentation).
#[derive(Debug, Clone)]
pub struct Spin {
    max: Duration,
    budget: Duration,
}

impl Spin {
    /// A spin of at most `max` (zero: never spin).
    pub fn new(max: Duration) -> Self {
        Self { max, budget: max }
    }

    /// The bound it was created with.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How long the next wait may spin before sleeping.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// When a wait starting at `now` stops spinning (at once on a crowded machine).
    pub fn until(&self, now: Instant) -> Instant {
        if self.budget.is_zero() || crowded(now) {
            return now;
        }
        now + self.budget
    }

    /// A wait got its answer `waited` after it began (spinning or sleeping). Up to twice the
    /// bound counts as quick: a wait that slept also paid for the wake-up, about the bound again.
    pub fn answered_after(&mut self, waited: Duration) {
        if waited <= 2 * self.max {
            self.budget = self.max;
        } else {
            self.budget /= 2;
            if self.budget < FLOOR {
                self.budget = Duration::ZERO;
            }
        }
    }
}

/// How often the machine's load is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(50);

/// Whether more threads are runnable than there are CPUs, as of at most [`LOOK_EVERY`] ago.
fn crowded(now: Instant) -> bool {
    static SEEN: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    match *seen {
        Some((at, crowded)) if now.saturating_duration_since(at) < LOOK_EVERY => crowded,
        _ => {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            let crowded = std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| runnable(&l))
                .is_some_and(|r| r > cpus);
            *seen = Some((now, crowded));
            crowded
        }
    }
}

/// The runnable threads in a `/proc/loadavg` line ("0.52 0.58 0.59 3/345 12345": 3, the
/// reader included).
fn runnable(loadavg: &str) -> Option<usize> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn quick_answers_keep_the_spin_and_late_ones_stop_it_until_answers_come_quickly_again() {
        let mut s = Spin::new(50 * US);
        assert_eq!(s.budget(), 50 * US);
        s.answered_after(12 * US);
        assert_eq!(s.budget(), 50 * US, "a quick answer keeps the full spin");
        let mut steps = 0;
        while s.budget() > Duration::ZERO {
            s.answered_after(3 * Duration::from_millis(1));
            steps += 1;
        }
        assert!(
            steps <= 5,
            "late answers stop the spin quickly: {steps} waits"
        );
        s.answered_after(90 * US);
        assert_eq!(
            s.budget(),
            50 * US,
            "a quick answer (with a wake-up) brings it back"
        );
        s.answered_after(101 * US);
        assert_eq!(s.budget(), 25 * US);
    }

    #[test]
    fn the_runnable_count_is_read_from_loadavg() {
        assert_eq!(runnable("0.52 0.58 0.59 3/345 12345\n"), Some(3));
        assert_eq!(runnable("0.52 0.58 0.59"), None);
        assert_eq!(runnable("a b c x/1 2"), None);
        let line = std::fs::read_to_string("/proc/loadavg").unwrap();
        assert!(runnable(&line).is_some_and(|r| r >= 1), "{line}");
    }

    #[test]
    fn a_zero_bound_never_spins() {
        let mut s = Spin::new(Duration::ZERO);
        s.answered_after(Duration::ZERO);
        assert_eq!(s.budget(), Duration::ZERO);
        let now = Instant::now();
        assert_eq!(s.until(now), now);
    }
}
