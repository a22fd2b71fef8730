//! Looking after the job as a whole, once per stop check: starting without everyone after
//! `--start-after-ms`, saying who a stalled round waits for, and evicting a worker that holds
//! everyone up for `--evict-after-ms`.

use std::time::{Duration, Instant};

use hetsync_transport::Transport;

use super::{Server, ServerError};
use crate::{Key, Rank};

/// How long a wait goes on before the log names who is awaited, and how often it says so again.
const NAME_AWAITED_AFTER: Duration = Duration::from_secs(2);

/// What the supervisor remembers between checks.
#[derive(Debug, Default)]
pub(super) struct Supervisor {
    /// When the first worker joined.
    pub first_join: Option<Instant>,
    /// When the log last named who is awaited.
    named: Option<Instant>,
}

impl<T: Transport> Server<T> {
    /// Starts without everyone, names who is awaited, evicts who holds everyone up.
    pub(super) fn supervise(&mut self, now: Instant) -> Result<(), ServerError> {
        if let (None, Some(after), Some(t0)) = (
            self.started,
            self.cfg.start_after,
            self.supervisor.first_join,
        ) {
            if now >= t0 + after {
                for key in 0..self.tensors.len() as Key {
                    self.tensors.policy(key).start(now);
                    self.drive(key, now)?;
                }
                if !self.tensors.started() {
                    // Nobody is here (the first to join left): wait for the next to come.
                    self.supervisor.first_join = None;
                    return Ok(());
                }
                let n = self.tensors.members();
                self.started = Some(now);
                self.log(format_args!(
                    "training starts with {n} of {} workers (--start-after-ms); the others join when they come",
                    self.cfg.workers
                ));
            }
        }
        if self.started.is_none() {
            return Ok(());
        }
        // Each awaited worker with its longest wait over the parts.
        let mut waits: Vec<(Rank, Instant)> = Vec::new();
        for key in 0..self.tensors.len() as Key {
            for (rank, since) in self.tensors.policy(key).awaited() {
                match waits.iter_mut().find(|(r, _)| *r == rank) {
                    Some(w) => w.1 = w.1.min(since),
                    None => waits.push((rank, since)),
                }
            }
        }
        let Some(since) = waits.iter().map(|w| w.1).min() else {
            return Ok(());
        };
        waits.sort_unstable();
        let who: Vec<Rank> = waits.iter().map(|w| w.0).collect();
        let waited = now.saturating_duration_since(since);
        if let Some(limit) = self.cfg.evict_after {
            let mut evicted = false;
            for &(rank, since) in &waits {
                let waited = now.saturating_duration_since(since);
                if waited < limit {
                    continue;
                }
                let why = format!(
                    "evicted: the others waited {:.1} s for its push (--evict-after-ms {})",
                    waited.as_secs_f64(),
                    limit.as_millis()
                );
                self.log(format_args!("evicting worker {rank}: {why}"));
                self.stats.evicted += 1;
                self.transport.disconnect(&mut self.arena, rank, &why);
                evicted = true;
            }
            if evicted {
                return Ok(());
            }
        }
        if waited >= NAME_AWAITED_AFTER
            && self
                .supervisor
                .named
                .is_none_or(|t| now >= t + NAME_AWAITED_AFTER)
        {
            self.supervisor.named = Some(now);
            let ranks: Vec<String> = who.iter().map(|r| r.to_string()).collect();
            self.log(format_args!(
                "waiting {:.1} s for worker(s) {} (a dead worker stalls {}: --evict-after-ms drops it, --policy timeout goes on without it)",
                waited.as_secs_f64(),
                ranks.join(", "),
                self.cfg.mode.name(),
            ));
        }
        Ok(())
    }
}
