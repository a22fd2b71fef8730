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
        // The longest wait over every part, and who it is for.
        let mut oldest: Option<Instant> = None;
        let mut who: Vec<Rank> = Vec::new();
        for key in 0..self.tensors.len() as Key {
            if let Some((since, ranks)) = self.tensors.policy(key).awaited() {
                oldest = Some(oldest.map_or(since, |o| o.min(since)));
                who.extend(ranks);
            }
        }
        let Some(since) = oldest else {
            return Ok(());
        };
        who.sort_unstable();
        who.dedup();
        let waited = now.saturating_duration_since(since);
        if let Some(limit) = self.cfg.evict_after.filter(|&l| waited >= l) {
            for &rank in &who {
                let why = format!(
                    "evicted: the others waited {:.1} s for its push (--evict-after-ms {})",
                    waited.as_secs_f64(),
                    limit.as_millis()
                );
                self.log(format_args!("evicting worker {rank}: {why}"));
                self.stats.evicted += 1;
                self.transport.disconnect(&mut self.arena, rank, &why);
            }
            return Ok(());
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
