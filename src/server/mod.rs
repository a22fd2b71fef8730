//! The parameter server: transport events go to the part's policy, its actions to the engine and
//! back out through the transport. Single-threaded; all waiting happens in [`Transport::poll`].
//!
//! Under a barrier policy a round's gradients are summed when it closes (late ones folded in or
//! dropped, [`LateMode`]); under a vector clock each push is applied as it arrives, scaled by one
//! over the job's workers.
//!
//! The server owns the [`Arena`] (every part's model, two versions, and every worker's slots) and
//! lends it to the transport on every call. Closing a round of a part sums the participants'
//! held slots into the part's model: in place when no send is reading it, else into the part's
//! other version, which becomes current while sends of the previous one finish undisturbed.

pub mod checkpoint;
mod config;
mod late;
mod report;
mod status;
mod supervise;
mod tensors;
mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetsync_transport::any::AnyServer;
use hetsync_transport::channel::ListenConfig;
use hetsync_transport::protocol::Parts;
use hetsync_transport::{Arena, ArenaError, Event, Transport, Update};

use crate::engine::{Kernel, Sgd};
use crate::sync::{Action, CloseCause};
use crate::{Clock, Key, Rank};
pub use config::{ServerConfig, ServerError, ServerReport, ServerStats, DEFAULT_PARTITION_BYTES};
use late::Folds;
pub use late::LateMode;
use report::Window;
use tensors::Tensors;
use trace::{PartName, Trace};

/// Longest single wait in the event loop: how quickly `stop` is noticed without a signal.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to take their goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// A parameter server driving transport `T`. The transport is declared before the arena: it
/// may hold registrations of the arena's memory, which must go first.
#[derive(Debug)]
pub struct Server<T: Transport> {
    transport: T,
    arena: Arena,
    tensors: Tensors,
    sgd: Sgd,
    kernel: Kernel,
    cfg: ServerConfig,
    stats: ServerStats,
    started: Option<Instant>,
    trace: Trace,
    folds: Folds,
    supervisor: supervise::Supervisor,
    checkpoint: Option<checkpoint::Checkpoint>,
    /// When the server started (for its uptime).
    born: Instant,
    /// The job round of the last checkpoint.
    checkpointed: u64,
}

/// Checks a configuration and cuts its tensors into parts.
fn parts_of(cfg: &ServerConfig) -> Result<Parts, ServerError> {
    if cfg.workers == 0 || cfg.dims.is_empty() || cfg.dims.contains(&0) {
        return Err(ServerError::Config(
            "--workers must be at least 1, and every tensor of --dims at least 1 float".into(),
        ));
    }
    Parts::new(&cfg.dims, cfg.partition_bytes).map_err(|e| ServerError::Config(e.to_string()))
}

impl Server<AnyServer> {
    /// Maps the arena and binds the transport `cfg` chooses; also returns a line saying which
    /// one and why.
    pub fn bind(cfg: ServerConfig) -> Result<(Self, String), ServerError> {
        let mut arena = Arena::new(cfg.workers, parts_of(&cfg)?).map_err(ServerError::Arena)?;
        let mut listen = ListenConfig::new(cfg.listen, cfg.workers, cfg.mode.push_clock());
        listen.limits.handshake = cfg.handshake_timeout;
        listen.write_timeout = cfg.write_timeout;
        listen.spin = cfg.spin;
        listen.secret = cfg.secret.clone().map(std::sync::Arc::new);
        let (transport, why) = AnyServer::bind(&listen, &mut arena, cfg.transport, &cfg.rdma)?;
        Ok((Self::new(transport, arena, cfg)?, why))
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }
}

impl<T: Transport> Server<T> {
    /// A server over an already bound transport and the arena it was bound with.
    pub fn new(transport: T, arena: Arena, cfg: ServerConfig) -> Result<Self, ServerError> {
        if parts_of(&cfg)? != *arena.parts() {
            return Err(ServerError::Config(
                "the arena was laid out for another job".into(),
            ));
        }
        if !cfg.lr.is_finite() || cfg.lr <= 0.0 {
            return Err(ServerError::Config(format!(
                "learning rate {} must be a positive number",
                cfg.lr
            )));
        }
        let trace = Trace::create(cfg.trace.as_deref(), cfg.round_log.as_deref())?;
        let parts = arena.parts();
        let job = checkpoint::job_hash(
            parts.dims(),
            parts.part_bytes(),
            cfg.workers,
            cfg.mode.name(),
        );
        let shape = checkpoint::Shape {
            parts: parts.len(),
            workers: cfg.workers,
            floats: parts.dims().iter().sum::<usize>(),
        };
        let resumed = match &cfg.resume {
            Some(path) => Some(checkpoint::load(path, job, shape)?),
            None => None,
        };
        let ckpt = match &cfg.checkpoint {
            Some(path) => Some(checkpoint::Checkpoint::open(path, job, shape)?),
            None => None,
        };
        let mut server = Self {
            tensors: Tensors::new(arena.parts().clone(), cfg.mode, cfg.workers),
            folds: Folds::new(arena.parts().len()),
            transport,
            arena,
            sgd: Sgd { lr: cfg.lr },
            kernel: Kernel::best(),
            cfg,
            stats: ServerStats::default(),
            started: None,
            supervisor: supervise::Supervisor::default(),
            checkpoint: ckpt,
            born: Instant::now(),
            checkpointed: 0,
            trace,
        };
        if let Some(saved) = resumed {
            server.resume(saved);
        } else if let Some(init) = server.cfg.init_model.take() {
            server.start_from(&init)?;
        }
        Ok(server)
    }

    /// Sets the model (every tensor in key order) before training: round 0 holds `init`.
    fn start_from(&mut self, init: &[f32]) -> Result<(), ServerError> {
        let floats: usize = self.arena.parts().dims().iter().sum();
        if init.len() != floats {
            return Err(ServerError::Config(format!(
                "the initial model has {} floats; the job's tensors ({:?}) have {floats}",
                init.len(),
                self.arena.parts().dims()
            )));
        }
        let mut at = 0;
        for key in 0..self.arena.parts().len() as Key {
            let n = self.arena.parts()[key].len;
            self.arena.restore(key, &init[at..at + n], 0);
            at += n;
        }
        Ok(())
    }

    /// Puts every part's model, round and clock back from a checkpoint.
    fn resume(&mut self, saved: checkpoint::Saved) {
        let mut at = 0;
        for key in 0..self.tensors.len() as Key {
            let n = self.arena.parts()[key].len;
            let round = saved.rounds[key as usize];
            self.arena.restore(key, &saved.model[at..at + n], round);
            self.tensors
                .policy(key)
                .resume(round, &saved.clocks[key as usize]);
            self.tensors.progressed(key);
            at += n;
        }
        self.tensors.resume(&saved.rounds);
        self.stats.rounds = self.tensors.job_rounds();
        self.checkpointed = self.stats.rounds;
        self.stats.resumed_at = self.stats.rounds;
        self.log(format_args!(
            "resumed from checkpoint {} of {}: the model as it was at job round {}",
            saved.seq,
            self.cfg
                .resume
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string()),
            self.stats.rounds
        ));
    }

    /// Writes a checkpoint if `--checkpoint-every` job rounds passed since the last (or `force`).
    fn maybe_checkpoint(&mut self, force: bool) -> Result<(), ServerError> {
        let Some(c) = self.checkpoint.as_mut() else {
            return Ok(());
        };
        let due = self.stats.rounds >= self.checkpointed + self.cfg.checkpoint_every.max(1);
        if !(due || force && self.stats.rounds > self.checkpointed) {
            return Ok(());
        }
        let clocks: Vec<Vec<Clock>> = (0..self.tensors.len() as Key)
            .map(|k| self.tensors.policy(k).clocks())
            .collect();
        self.checkpointed = self.stats.rounds;
        match c.save(&self.arena, &clocks) {
            Ok(_) => self.stats.checkpoints += 1,
            // A full or failing disk costs the checkpoint, not the run: the previous one stays.
            Err(e) => eprintln!("hetsync server: warning: {e}; training goes on"),
        }
        Ok(())
    }

    /// Serves until the round limit, the duration, or `stop` (seen within 100 ms, at once when a
    /// signal interrupts the wait); then saves the model if asked and says goodbye.
    pub fn run(mut self, stop: &AtomicBool) -> Result<ServerReport, ServerError> {
        let mut events = Vec::new();
        let mut expired = Vec::new();
        let mut window: Option<Window> = None;
        // A fixed schedule, so the wait's deadline only changes when something happened.
        let mut check = Instant::now() + STOP_CHECK;
        loop {
            let now = Instant::now();
            self.tensors.expired(now, &mut expired);
            for key in expired.drain(..) {
                self.tensors.policy(key).handle_timeout(now);
                self.drive(key, now)?;
            }
            if self.done(now) || stop.load(Ordering::Relaxed) {
                break;
            }
            while check <= now {
                check += STOP_CHECK;
                if check > now {
                    self.supervise(now)?;
                }
            }
            let mut deadline = check;
            if let Some(t) = self.tensors.next_deadline() {
                deadline = deadline.min(t);
            }
            if let (Some(t0), Some(d)) = (self.started, self.cfg.duration) {
                deadline = deadline.min(t0 + d);
            }
            if let (Some(every), Some(t0)) = (self.cfg.progress, self.started) {
                let w = window.get_or_insert_with(|| Window::open(t0, &self.stats));
                if now >= w.at + every {
                    report::progress(
                        w,
                        now,
                        &self.stats,
                        self.tensors.members(),
                        self.cfg.workers,
                        self.cfg.mode.is_clocked(),
                    );
                }
                deadline = deadline.min(w.at + every);
            }
            self.transport
                .poll(&mut self.arena, &mut events, Some(deadline))?;
            let now = Instant::now();
            for ev in events.drain(..) {
                self.on_event(ev, now)?;
            }
            self.maybe_checkpoint(false)?;
        }
        let end = Instant::now();
        self.maybe_checkpoint(true)?;
        self.trace.flush()?;
        if let Some(path) = &self.cfg.save_model {
            report::save_model(path, &self.arena).map_err(|source| ServerError::SaveModel {
                path: path.clone(),
                source,
            })?;
        }
        self.transport.shutdown(&mut self.arena, SHUTDOWN_GRACE);
        Ok(ServerReport {
            started: self.started.is_some(),
            stats: self.stats,
            elapsed: self.started.map_or(Duration::ZERO, |t0| end - t0),
            kernel: self.kernel,
        })
    }

    /// Whether part `key` has closed the run's last round (barrier policies; under a vector
    /// clock the run ends on the slowest worker's clock and every push counts).
    fn finished_part(&mut self, key: Key) -> bool {
        !self.cfg.mode.is_clocked()
            && self
                .cfg
                .rounds
                .is_some_and(|r| self.tensors.policy(key).round() >= r)
    }

    fn done(&self, now: Instant) -> bool {
        let rounds = self.cfg.rounds.is_some_and(|r| self.stats.rounds >= r);
        let time =
            matches!((self.started, self.cfg.duration), (Some(t0), Some(d)) if now >= t0 + d);
        rounds || time
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.cfg.log_events {
            eprintln!("hetsync server: {msg}");
        }
    }

    fn on_event(&mut self, ev: Event, now: Instant) -> Result<(), ServerError> {
        match ev {
            Event::Joined { rank } => {
                self.stats.joins += 1;
                self.supervisor.first_join.get_or_insert(now);
                for key in 0..self.tensors.len() as Key {
                    self.tensors.policy(key).on_join(rank, now);
                    self.drive(key, now)?;
                }
                let n = self.tensors.members();
                self.log(format_args!(
                    "worker {rank} joined ({n}/{} connected)",
                    self.cfg.workers
                ));
                if self.started.is_none() && self.tensors.started() {
                    self.started = Some(now);
                    let parts = self.arena.parts();
                    self.log(format_args!(
                        "all {} workers joined: training starts ({} kernel, {} tensors, {} floats, {} parts of at most {} KiB)",
                        self.cfg.workers,
                        self.kernel.name(),
                        parts.dims().len(),
                        parts.dims().iter().sum::<usize>(),
                        parts.len(),
                        parts.part_bytes() / 1024,
                    ));
                }
            }
            Event::Pushed { rank, key, clock } => {
                if self.finished_part(key) {
                    // Under a barrier a part may run a round ahead of the key's slowest part
                    // (a late push is answered at once). Once it has closed every round the run
                    // asked for, a push is handed back with the part's final model unapplied:
                    // its worker goes on with the parts still running, and the saved model is
                    // exactly the rounds the run closed and logged.
                    self.arena.lend(rank, key);
                    self.transport.send_model(&mut self.arena, rank, key);
                    return Ok(());
                }
                if let Err(e) = self.tensors.policy(key).on_push(rank, clock, now) {
                    self.log(format_args!("dropping worker {rank}: {e}"));
                    self.transport
                        .disconnect(&mut self.arena, rank, &e.to_string());
                }
                self.drive(key, now)?;
            }
            Event::Left { rank, reason } => {
                self.stats.departures += 1;
                for key in 0..self.tensors.len() as Key {
                    self.tensors.policy(key).on_leave(rank, now);
                    self.drive(key, now)?;
                }
                self.log(format_args!("worker {rank} left: {reason}"));
            }
            Event::StatusRequested { request } => self.answer_status(request, now),
            Event::Refused { peer, reason } => {
                self.stats.refused += 1;
                *self
                    .stats
                    .refused_by_reason
                    .entry(status::refusal_kind(&reason).to_string())
                    .or_default() += 1;
                self.log(format_args!("refused {peer}: {reason}"));
            }
        }
        Ok(())
    }

    /// Milliseconds since training started (0 before).
    fn t_ms(&self, now: Instant) -> f64 {
        self.started.map_or(0.0, |t0| {
            now.saturating_duration_since(t0).as_secs_f64() * 1e3
        })
    }

    fn part_name(&self, key: Key) -> PartName {
        let (tensor, index, several) = self.tensors.part_of(key);
        PartName {
            key: tensor,
            part: several.then_some(index),
        }
    }

    /// Performs part `key`'s pending actions and re-arms its timer.
    fn drive(&mut self, key: Key, now: Instant) -> Result<(), ServerError> {
        while let Some(action) = self.tensors.policy(key).poll_action() {
            match action {
                Action::CloseRound {
                    round,
                    participants,
                    missing,
                    cause,
                } => self.close(key, round, &participants, missing, cause, now)?,
                Action::Apply { rank, clock } => self.apply(key, rank, clock, now)?,
                Action::Serve {
                    rank,
                    clock,
                    min_clock,
                } => {
                    debug_assert_eq!(self.tensors.policy(key).round(), self.arena.round(key));
                    if self.trace.detailed() {
                        let (at, t) = (self.part_name(key), self.t_ms(now));
                        self.trace.pull_served(rank, at, clock, min_clock, t)?;
                    }
                    self.transport.send_model(&mut self.arena, rank, key);
                }
                Action::Late { rank, clock, round } => self.late(key, rank, clock, round, now)?,
            }
        }
        self.tensors.rearm(key);
        self.tensors.progressed(key);
        self.stats.rounds = self.tensors.job_rounds();
        Ok(())
    }

    /// A late gradient: folded into the part's next round (copied out of the slot first) or
    /// dropped; either way the slot goes back to the worker, whose reply follows.
    fn late(
        &mut self,
        key: Key,
        rank: Rank,
        clock: Clock,
        round: Clock,
        now: Instant,
    ) -> Result<(), ServerError> {
        let weight = match (self.cfg.late, self.arena.gradient(rank, key)) {
            (LateMode::Fold, Some(grad)) => Some(self.folds.add(key, grad, rank, clock, round)),
            _ => None,
        };
        self.arena.lend(rank, key);
        // A folded gradient is counted once its round closes; a dropped one now, once per key
        // (every part of the push comes late).
        if weight.is_none() && self.tensors.part_of(key).1 == 0 {
            self.stats.dropped += 1;
        }
        if self.trace.detailed() {
            let (at, t) = (self.part_name(key), self.t_ms(now));
            self.trace.late(rank, at, (clock, round), weight, t)?;
        }
        Ok(())
    }

    /// Applies worker `rank`'s push at `clock` to part `key` at once, as one of the job's
    /// workers' share of a step (vector clocks).
    fn apply(
        &mut self,
        key: Key,
        rank: Rank,
        clock: Clock,
        now: Instant,
    ) -> Result<(), ServerError> {
        let (sgd, kernel, w) = (self.sgd, self.kernel, self.cfg.workers as f32);
        // Without the gradient (its worker's connection ended since) the model is only copied
        // forward, so its round still counts the push, as the policy does.
        let used = self.update(key, &[rank], |target, grads| match target {
            Update::InPlace(model) => sgd.step_by(kernel, model, grads, w),
            Update::Into { next, model } => sgd.apply_by(kernel, next, model, grads, w),
        });
        let first_part = self.tensors.part_of(key).1 == 0;
        if used.is_empty() {
            self.stats.dropped += u64::from(first_part);
            return Ok(());
        }
        self.arena.lend(rank, key);
        let at = self.part_name(key);
        if first_part {
            self.stats.pushes_applied += 1;
        }
        if self.trace.detailed() {
            let t = self.t_ms(now);
            self.trace.push_applied(rank, at, clock, t)?;
        }
        Ok(())
    }

    /// Runs `f` over part `key`'s model and the held gradients of `ranks` (which must be held),
    /// releasing a version a slow reader still holds if both are busy. Returns the ranks whose
    /// gradient was used: releasing may drop a stuck peer, whose slots are then lent again.
    /// `f` runs once: a refused [`Arena::update`] changes nothing and calls nothing.
    fn update(
        &mut self,
        key: Key,
        ranks: &[Rank],
        mut f: impl FnMut(Update<'_>, &[&[f32]]),
    ) -> Vec<Rank> {
        let held_of = |arena: &Arena| -> Vec<Rank> {
            ranks
                .iter()
                .copied()
                .filter(|&r| arena.gradient(r, key).is_some())
                .collect()
        };
        let mut held = held_of(&self.arena);
        if let Err(ArenaError::VersionBusy { version, .. }) = self.arena.update(key, &held, &mut f)
        {
            // Both versions are being sent: a slow reader of the older one gets its own copy.
            // Releasing may drop a stuck peer, perhaps a participant: ask again who is held.
            self.transport.release(&mut self.arena, key, version);
            held = held_of(&self.arena);
            self.arena
                .update(key, &held, &mut f)
                .expect("a released version has no readers");
        }
        held
    }

    /// Closes `round` of part `key`: the SGD step over the participants' gradients and the
    /// late ones folded in since the last close, then the participants' slots go back to them.
    fn close(
        &mut self,
        key: Key,
        round: u64,
        participants: &[Rank],
        missing: usize,
        cause: CloseCause,
        now: Instant,
    ) -> Result<(), ServerError> {
        // A participant whose connection ended since its push has had its slots lent again (the
        // transport does that before the rank can be taken anew): its gradient left with it.
        let (sgd, kernel) = (self.sgd, self.kernel);
        let mut folds = std::mem::replace(&mut self.folds, Folds::new(0));
        let fold = folds.pending(key);
        let held = self.update(key, participants, |target, grads| {
            let mut all = grads.to_vec();
            let mut weight = grads.len() as f32;
            if let Some((sum, w)) = fold {
                all.push(sum);
                // At least 1: late gradients alone (every on-time participant gone) keep their
                // down-weighting.
                weight = (weight + w).max(1.0);
            }
            match target {
                Update::InPlace(model) => sgd.step_by(kernel, model, &all, weight),
                Update::Into { next, model } => sgd.apply_by(kernel, next, model, &all, weight),
            }
        });
        let folded = folds.taken(key);
        self.folds = folds;
        for &r in &held {
            self.arena.lend(r, key);
        }
        let gone = participants.len() - held.len();
        if self.tensors.part_of(key).1 == 0 {
            self.stats.dropped += gone as u64;
        }
        let missing = missing + gone;
        let Some(done) = self
            .tensors
            .part_closed(key, round, &held, missing, cause, folded)
        else {
            return Ok(());
        };
        // Late gradients as their key's first part saw them: one per late push of the key.
        let folded = done
            .folded
            .iter()
            .filter(|f| f.parts.is_empty() || f.parts.contains(&0))
            .count() as u64;
        self.stats.key_rounds += 1;
        self.stats.participants += done.participants.len() as u64;
        self.stats.late_folded += folded;
        self.stats.pushes_applied += done.participants.len() as u64 + folded;
        self.stats.stragglers += done.missing as u64;
        if done.cause == CloseCause::Timeout {
            self.stats.timeouts += 1;
        }
        let t_ms = self.t_ms(now);
        self.trace.round_closed(&done, t_ms)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
