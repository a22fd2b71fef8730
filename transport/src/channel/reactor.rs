//! Readiness and time: one level-triggered epoll set (nix) with the listening socket, a timerfd
//! for sub-millisecond deadlines, any extra fd a transport watches (the RDMA completion channel),
//! and the connections. The timer is re-armed only when the deadline asked for changes.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::spin::Spin;
use crate::TransportError;

/// Token of the listening socket.
pub const LISTENER: u64 = u64::MAX;
/// Token of the timer.
const TIMER: u64 = u64::MAX - 1;
/// Token of a watched fd.
pub const WATCH: u64 = u64::MAX - 2;

/// What became ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The token it was registered with.
    pub token: u64,
    /// Readable (or hung up, or in error: a read will say which).
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// The epoll set and its timer.
#[derive(Debug)]
pub struct Reactor {
    epoll: Epoll,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    /// `timerfd_settime` calls so far.
    timer_sets: u64,
    /// How long a wait polls before it sleeps.
    spin: Spin,
    events: Vec<EpollEvent>,
}

/// The events a connection is watched for: readable (and hang-ups) always, writable while it
/// has output waiting.
pub fn interest(write: bool) -> EpollFlags {
    let base = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
    if write {
        base | EpollFlags::EPOLLOUT
    } else {
        base
    }
}

impl Reactor {
    /// An epoll set with its timer registered.
    pub fn new() -> Result<Self, TransportError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| TransportError::os("epoll_create1", e))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| TransportError::os("timerfd_create", e))?;
        epoll
            .add(&timer, EpollEvent::new(EpollFlags::EPOLLIN, TIMER))
            .map_err(|e| TransportError::os("epoll_ctl(ADD timerfd)", e))?;
        Ok(Self {
            epoll,
            timer,
            armed: None,
            timer_sets: 0,
            spin: Spin::new(Duration::ZERO),
            events: vec![EpollEvent::empty(); 256],
        })
    }

    /// Watches `fd` for reading under `token`.
    pub fn add_reader(&self, fd: BorrowedFd<'_>, token: u64) -> nix::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
    }

    /// Watches a connection for reading, and for writing when `write`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, write: bool) -> nix::Result<()> {
        self.epoll.add(fd, EpollEvent::new(interest(write), token))
    }

    /// Changes a connection's interest in writing.
    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, write: bool) -> nix::Result<()> {
        self.epoll
            .modify(fd, &mut EpollEvent::new(interest(write), token))
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: impl AsFd) {
        let _ = self.epoll.delete(fd);
    }

    /// Waits until something is ready or `deadline` passes (at once when `deadline` is now or
    /// earlier; forever when `None`), and appends what is ready to `out`. A signal ends the wait
    /// early with nothing ready.
    pub fn wait(
        &mut self,
        deadline: Option<Instant>,
        out: &mut Vec<Ready>,
    ) -> Result<(), TransportError> {
        let now = Instant::now();
        let n = match deadline {
            Some(d) if d <= now => self.epoll_wait(EpollTimeout::ZERO)?.unwrap_or(0),
            _ => {
                // Poll for a while first: an answer on its way is taken without the wake-up
                // of a sleeping thread (tens of microseconds across cores).
                let until = self.spin.until(now);
                let spin_until = deadline.map_or(until, |d| d.min(until));
                let mut got = Some(0);
                while got == Some(0) && Instant::now() < spin_until {
                    got = self.epoll_wait(EpollTimeout::ZERO)?;
                    std::hint::spin_loop();
                }
                if got == Some(0) {
                    let after = Instant::now();
                    got = match deadline {
                        // The deadline passed while spinning: no sleep (arming the timer for
                        // a zero duration would disarm it).
                        Some(d) if d <= after => Some(0),
                        _ => {
                            self.arm(deadline, after)?;
                            self.epoll_wait(EpollTimeout::NONE)?
                        }
                    };
                }
                // Whatever ended the wait (an event, the timer, a signal): its length says
                // whether spinning pays.
                self.spin.answered_after(now.elapsed());
                got.unwrap_or(0)
            }
        };
        for ev in &self.events[..n] {
            if ev.data() == TIMER {
                // Drain the expiration count; EAGAIN means it was already drained.
                let _ = self.timer.wait();
                self.armed = None;
                continue;
            }
            let flags = ev.events();
            out.push(Ready {
                token: ev.data(),
                read: flags.intersects(!EpollFlags::EPOLLOUT),
                write: flags.contains(EpollFlags::EPOLLOUT),
            });
        }
        Ok(())
    }

    /// Polls for at most `spin` before each wait that would sleep (zero: never).
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = Spin::new(spin);
    }

    /// One `epoll_wait`: how many events, or `None` when a signal interrupted it.
    fn epoll_wait(&mut self, timeout: EpollTimeout) -> Result<Option<usize>, TransportError> {
        match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => Ok(Some(n)),
            Err(Errno::EINTR) => Ok(None),
            Err(e) => Err(TransportError::os("epoll_wait", e)),
        }
    }

    /// Waits at most `ms` milliseconds for readiness and discards it, without touching the timer
    /// (shutdown's bounded lingering, which then polls every connection itself).
    pub fn wait_briefly(&mut self, ms: u16) {
        let _ = self.epoll.wait(&mut self.events, EpollTimeout::from(ms));
    }

    fn arm(&mut self, deadline: Option<Instant>, now: Instant) -> Result<(), TransportError> {
        if deadline == self.armed {
            return Ok(());
        }
        match deadline {
            // At least a nanosecond: a zero duration disarms a timerfd.
            Some(d) => self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(
                    d.saturating_duration_since(now)
                        .max(Duration::from_nanos(1)),
                )),
                TimerSetTimeFlags::empty(),
            ),
            None => self.timer.unset(),
        }
        .map_err(|e| TransportError::os("timerfd_settime", e))?;
        self.armed = deadline;
        self.timer_sets += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timer_is_set_only_when_the_deadline_changes() {
        use std::io::Write;
        let mut r = Reactor::new().unwrap();
        // A socket that stays readable wakes every wait at once: many passes, one deadline.
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        tx.write_all(b"x").unwrap();
        r.add_reader(rx.as_fd(), WATCH).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        for _ in 0..100 {
            r.wait(Some(deadline), &mut out).unwrap();
        }
        assert_eq!(out.len(), 100, "every pass saw the socket");
        assert_eq!(r.timer_sets, 1, "one timerfd_settime for one deadline");
        // A deadline already past does not touch the timer at all.
        r.wait(Some(Instant::now()), &mut out).unwrap();
        assert_eq!(r.timer_sets, 1);
        // A new deadline sets it once more, and so does dropping it.
        r.wait(Some(deadline + Duration::from_secs(1)), &mut out)
            .unwrap();
        r.wait(None, &mut out).unwrap();
        assert_eq!(r.timer_sets, 3);
    }

    #[test]
    fn a_deadline_that_passes_while_spinning_ends_the_wait() {
        use std::io::Write;
        let mut r = Reactor::new().unwrap();
        r.set_spin(Duration::from_millis(200));
        // Wakes the reactor after 3 s in case the deadline is missed (the test then fails
        // instead of hanging).
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        r.add_reader(rx.as_fd(), WATCH).unwrap();
        let rescue = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            let _ = tx.write_all(b"x");
        });
        let mut out = Vec::new();
        let start = Instant::now();
        r.wait(Some(start + Duration::from_millis(5)), &mut out)
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the wait ran past its deadline: {:?}",
            start.elapsed()
        );
        assert!(out.is_empty());
        rescue.join().unwrap();
    }

    #[test]
    fn the_timer_ends_the_wait() {
        let mut r = Reactor::new().unwrap();
        let mut out = Vec::new();
        let soon = Instant::now() + Duration::from_millis(20);
        r.wait(Some(soon), &mut out).unwrap();
        assert!(Instant::now() >= soon, "woke before the deadline");
        assert!(out.is_empty());
    }
}
