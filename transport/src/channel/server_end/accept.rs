//! Taking connections in, within bounds: pending connections capped in total and per source
//! (the oldest dropped first, see [`Admission`](super::super::admission::Admission)), a
//! handshake deadline, a write deadline for peers that stop reading, and `accept` errors
//! (out of file descriptors, of buffers) answered by backing off instead of spinning on a
//! listener that stays readable.

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::{Peer, ServerEnd};
use crate::channel::connection::Connection;
use crate::channel::outbox::Outbox;
use crate::channel::reactor::LISTENER;
use crate::{Arena, Event};

/// The first pause after an `accept` error; doubled while errors repeat, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest pause in accepting.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often peers with unsent output are checked against the write deadline.
pub(super) const SWEEP: Duration = Duration::from_secs(1);

/// Whether an `accept` error means the process or the system is out of a resource (so the
/// listener stays readable and accepting again at once would spin).
fn exhausted(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// The source a per-address limit counts: an IPv4 address (IPv4-mapped ones too), or an
/// IPv6 address's /64, which one host usually owns whole.
fn source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => {
                let s = v6.segments();
                std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).into()
            }
        },
        v4 => v4,
    }
}

impl ServerEnd {
    /// Accepts every waiting connection, dropping the oldest pending ones beyond the limits.
    pub(super) fn accept_all(&mut self, arena: &mut Arena) {
        loop {
            let (stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if exhausted(&e) => return self.pause_accepting(e),
                // ECONNABORTED and the like: that one connection is lost; keep serving.
                Err(e) => {
                    self.pending.push(Event::Refused {
                        peer: "(unknown)".into(),
                        reason: format!("accept failed: {e}"),
                    });
                    continue;
                }
            };
            self.backoff = FIRST_BACKOFF;
            let peer = addr.to_string();
            if let Err(e) = stream
                .set_nonblocking(true)
                .and_then(|_| stream.set_nodelay(true))
            {
                self.pending.push(Event::Refused {
                    peer,
                    reason: format!("socket setup failed: {e}"),
                });
                continue;
            }
            let idx = self.free.pop().unwrap_or_else(|| {
                self.peers.push(None);
                self.peers.len() - 1
            });
            self.next_gen += 1;
            let token = (self.next_gen << 32) | idx as u64;
            if let Err(e) = self.reactor.add(stream.as_fd(), token, false) {
                self.free.push(idx);
                self.pending.push(Event::Refused {
                    peer,
                    reason: format!("epoll_ctl(ADD) failed: {e}"),
                });
                continue;
            }
            self.peers[idx] = Some(Peer {
                stream,
                token,
                addr: peer,
                rank: None,
                conn: Connection::new(),
                out: Outbox::default(),
                want_write: false,
                join_pending: false,
                rdma_data: false,
                stalled_since: None,
                challenged: None,
                close_when_sent: false,
            });
            let evicted = self
                .admission
                .accepted(idx, source(addr.ip()), Instant::now());
            for (victim, why) in evicted {
                let reason = why.reason(self.admission.limits());
                self.refuse(arena, victim, &reason);
            }
        }
    }

    /// `accept` failed for want of a resource: stop watching the listener for a while (the
    /// connection stays in the kernel's backlog), and say so once per episode.
    fn pause_accepting(&mut self, e: io::Error) {
        self.reactor.delete(&self.listener);
        self.accept_paused = Some(Instant::now() + self.backoff);
        self.pending.push(Event::Refused {
            peer: "(not accepted yet)".into(),
            reason: format!(
                "accept failed: {e}; not accepting for {} ms (raise the open-file limit, `ulimit -n`, if this repeats)",
                self.backoff.as_millis()
            ),
        });
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Watches the listener again once a pause has passed.
    pub(super) fn resume_accepting(&mut self, arena: &mut Arena, now: Instant) {
        if self.accept_paused.is_some_and(|t| now >= t) {
            self.accept_paused = None;
            if let Err(e) = self.reactor.add_reader(self.listener.as_fd(), LISTENER) {
                // Try again after another pause rather than never accept again.
                return self.pause_accepting(e.into());
            }
            self.accept_all(arena);
        }
    }

    /// Drops connections that did not join in time, and peers whose queued output made no
    /// progress within the write deadline.
    pub(super) fn enforce_deadlines(&mut self, arena: &mut Arena, now: Instant) {
        for idx in self.admission.expired(now) {
            let why = format!(
                "no complete handshake within {} s",
                self.admission.limits().handshake.as_secs_f64()
            );
            self.refuse(arena, idx, &why);
        }
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP;
        let limit = self.write_timeout;
        for idx in 0..self.peers.len() {
            let stuck = self.peers[idx]
                .as_ref()
                .and_then(|p| p.stalled_since)
                .is_some_and(|t| now.saturating_duration_since(t) >= limit);
            if stuck {
                let why = format!(
                    "it read nothing of what was sent to it for {} s",
                    limit.as_secs_f64()
                );
                let p = self.peers[idx].as_ref().expect("live peer");
                let e = p.io_err("write", io::Error::new(io::ErrorKind::TimedOut, why));
                self.fail(arena, idx, e);
            }
        }
    }

    /// The next time [`enforce_deadlines`](Self::enforce_deadlines) or
    /// [`resume_accepting`](Self::resume_accepting) has something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [
            self.admission.next_deadline(),
            (self.stalled > 0).then_some(self.next_sweep),
            self.accept_paused,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::source;

    #[test]
    fn an_ipv6_host_counts_as_its_slash_64_and_mapped_ipv4_as_ipv4() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(c));
        let m: std::net::IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(source(m), "10.0.0.7".parse::<std::net::IpAddr>().unwrap());
    }
}
