//! The parameter server: transport events go to the part's policy, its actions to the engine and
//! back out through the transport. Single-threaded; all waiting happens in [`Transport::poll`].
//!
//! The server owns the [`Arena`] (every part's model, two versions, and every worker's slots) and
//! lends it to the transport on every call. Closing a round of a part sums the participants'
//! held slots into the part's model: in place when no send is reading it, else into the part's
//! other version, which becomes current while sends of the previous one finish undisturbed.

mod report;
mod tensors;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetsync_transport::any::{AnyServer, Choice, RdmaSelect};
use hetsync_transport::channel::ListenConfig;
use hetsync_transport::protocol::Parts;
use hetsync_transport::{Arena, ArenaError, Event, Transport, TransportError, Update};
use serde::Serialize;

use crate::engine::{Kernel, Sgd};
use crate::sync::{Action, BarrierMode, CloseCause};
use crate::{Key, Rank};
use report::{RoundLog, Window};
use tensors::Tensors;

/// Longest single wait in the event loop: how quickly `stop` is noticed without a signal.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to take their goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// The partition size when none is given: 1 MiB. Measured on a 2-vCPU VM over loopback TCP, one
/// worker, 16 MiB push+pull rounds (medians of 5 interleaved runs): whole tensor 23.0 ms, parts of
/// 1 MiB 15.0 ms, 256 KiB 14.3 ms (the same within the spread), 64 KiB slower again. 1 MiB keeps
/// the number of parts (policies, frames, RDMA work requests) four times lower for large models.
pub const DEFAULT_PARTITION_BYTES: usize = 1 << 20;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// Workers in the job.
    pub workers: usize,
    /// Elements (f32) of each tensor, in key order.
    pub dims: Vec<usize>,
    /// Largest part in bytes: larger tensors travel and synchronise in parts.
    pub partition_bytes: usize,
    /// When rounds close.
    pub mode: BarrierMode,
    /// SGD learning rate.
    pub lr: f32,
    /// Stop after every key has closed this many rounds.
    pub rounds: Option<u64>,
    /// Stop this long after training starts (every worker joined).
    pub duration: Option<Duration>,
    /// Print a progress line to stderr this often.
    pub progress: Option<Duration>,
    /// Log joins, departures and refusals to stderr.
    pub log_events: bool,
    /// Write one JSON line per closed key round here.
    pub round_log: Option<PathBuf>,
    /// Write the final model here (every tensor in key order, raw little-endian f32).
    pub save_model: Option<PathBuf>,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
}

impl ServerConfig {
    /// A job of `workers` workers and tensors of `dims` floats on `listen`, with the defaults of
    /// `hetsync server`: the timeout barrier at 10 ms, learning rate 0.1, 1 MiB parts, no round
    /// limit, quiet, the transport chosen automatically.
    pub fn new(listen: SocketAddr, workers: usize, dims: Vec<usize>) -> Self {
        Self {
            listen,
            workers,
            dims,
            partition_bytes: DEFAULT_PARTITION_BYTES,
            mode: BarrierMode::Timeout(Duration::from_millis(10)),
            lr: 0.1,
            rounds: None,
            duration: None,
            progress: None,
            log_events: false,
            round_log: None,
            save_model: None,
            transport: Choice::Auto,
            rdma: RdmaSelect::default(),
        }
    }
}

/// Counters of a run. Rounds are key rounds: a key's round closes once all its parts closed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// Rounds every key has closed (the job's steps).
    pub rounds: u64,
    /// Key rounds closed, summed over keys.
    pub key_rounds: u64,
    /// Gradients aggregated (in every part of their key), summed over key rounds.
    pub participants: u64,
    /// Workers missing from closed key rounds, summed (stragglers left behind).
    pub stragglers: u64,
    /// Late gradients dropped (one per worker, key and round).
    pub late_dropped: u64,
    /// Key rounds in which some part closed by the timeout rather than by everyone arriving.
    pub timeouts: u64,
    /// Workers that joined (including rejoins).
    pub joins: u64,
    /// Workers that left or were dropped.
    pub departures: u64,
    /// Connections refused at the handshake.
    pub refused: u64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct ServerReport {
    /// Whether every worker joined and training ran.
    pub started: bool,
    /// Counters.
    pub stats: ServerStats,
    /// Time from the start of training (every worker joined) to the end.
    pub elapsed: Duration,
    /// The aggregation kernel used.
    pub kernel: Kernel,
}

impl ServerReport {
    /// Rounds (of every key) closed per second of training.
    pub fn rounds_per_sec(&self) -> f64 {
        self.stats.rounds as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean gradients per closed key round.
    pub fn mean_participants(&self) -> f64 {
        self.stats.participants as f64 / (self.stats.key_rounds.max(1)) as f64
    }
}

/// A failure that stops the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed as a whole.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The round log could not be written.
    #[error("writing the round log {path}: {source}")]
    RoundLog {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The model could not be saved.
    #[error("saving the model to {path}: {source}")]
    SaveModel {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The arena could not be mapped.
    #[error("mapping the model and gradient memory: {0}")]
    Arena(#[source] std::io::Error),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

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
    round_log: Option<RoundLog>,
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
        let listen = ListenConfig {
            listen: cfg.listen,
            workers: cfg.workers,
        };
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
        let round_log = cfg.round_log.as_deref().map(RoundLog::create).transpose()?;
        Ok(Self {
            tensors: Tensors::new(arena.parts().clone(), cfg.mode, cfg.workers),
            transport,
            arena,
            sgd: Sgd { lr: cfg.lr },
            kernel: Kernel::best(),
            cfg,
            stats: ServerStats::default(),
            started: None,
            round_log,
        })
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
        }
        let end = Instant::now();
        if let Some(log) = self.round_log.as_mut() {
            log.flush()?;
        }
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
            Event::Refused { peer, reason } => {
                self.stats.refused += 1;
                self.log(format_args!("refused {peer}: {reason}"));
            }
        }
        Ok(())
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
                Action::Serve { rank } => {
                    debug_assert_eq!(self.tensors.policy(key).round(), self.arena.round(key));
                    self.transport.send_model(&mut self.arena, rank, key);
                }
                Action::DiscardLate { rank, clock, .. } => {
                    // Done with that gradient: the slot is the worker's again (the policy serves
                    // it the current model next).
                    self.arena.lend(rank, key);
                    if self.tensors.first_late(key, rank, clock) {
                        self.stats.late_dropped += 1;
                    }
                }
            }
        }
        self.tensors.rearm(key);
        Ok(())
    }

    /// Closes `round` of part `key`: the SGD step over the participants' gradients, then their
    /// slots go back to them.
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
        let held_of = |arena: &Arena| -> Vec<Rank> {
            participants
                .iter()
                .copied()
                .filter(|&r| arena.gradient(r, key).is_some())
                .collect()
        };
        let (sgd, kernel) = (self.sgd, self.kernel);
        let step = |arena: &mut Arena, held: &[Rank]| {
            arena.update(key, held, |target, grads| match target {
                Update::InPlace(model) => sgd.step(kernel, model, grads),
                Update::Into { next, model } => sgd.apply(kernel, next, model, grads),
            })
        };
        let mut held = held_of(&self.arena);
        if let Err(ArenaError::VersionBusy { version, .. }) = step(&mut self.arena, &held) {
            // Both versions are being sent: a slow reader of the older one gets its own copy.
            // Releasing may drop a stuck peer, perhaps a participant: ask again who is held.
            self.transport.release(&mut self.arena, key, version);
            held = held_of(&self.arena);
            step(&mut self.arena, &held).expect("a released version has no readers");
        }
        for &r in &held {
            self.arena.lend(r, key);
        }
        let missing = missing + (participants.len() - held.len());
        let Some(done) = self.tensors.part_closed(key, round, &held, missing, cause) else {
            return Ok(());
        };
        self.stats.rounds = self.tensors.job_rounds();
        self.stats.key_rounds += 1;
        self.stats.participants += done.participants.len() as u64;
        self.stats.stragglers += done.missing as u64;
        if done.cause == CloseCause::Timeout {
            self.stats.timeouts += 1;
        }
        if let Some(log) = self.round_log.as_mut() {
            let t_ms = self
                .started
                .map_or(0.0, |t0| (now - t0).as_secs_f64() * 1e3);
            log.write(&done, t_ms)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hetsync_transport::{Key, Version};
    use std::collections::VecDeque;
    use std::sync::mpsc;

    /// A transport that plays scripted events, whose sends never finish (so both model versions
    /// end up being read), and whose `release` drops a worker the way RDMA drops a stuck peer.
    #[derive(Debug)]
    struct Scripted {
        script: VecDeque<Vec<Event>>,
        sends: Vec<(Rank, Key, Version)>,
        victim: Rank,
    }

    impl Transport for Scripted {
        fn poll(
            &mut self,
            arena: &mut Arena,
            events: &mut Vec<Event>,
            _: Option<Instant>,
        ) -> Result<(), TransportError> {
            for ev in self.script.pop_front().unwrap_or_default() {
                if let Event::Pushed { rank, key, clock } = ev {
                    arena.receive_into(rank, key).unwrap().fill(0);
                    arena.hand_over(rank, key, clock).unwrap();
                }
                events.push(ev);
            }
            Ok(())
        }
        fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
            let (v, _) = arena.start_send(key);
            self.sends.push((rank, key, v));
        }
        fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
            // The victim's write never completes: it is dropped, its slots lent again, and its
            // sends (and, for this test, everyone's) stop reading.
            arena.reset_worker(self.victim);
            for &(_, k, v) in &self.sends {
                if (k, v) == (key, version) {
                    arena.end_send(k, v);
                }
            }
            self.sends.retain(|&(_, k, v)| (k, v) != (key, version));
        }
        fn disconnect(&mut self, _: &mut Arena, _: Rank, why: &str) {
            panic!("nobody should be dropped by the server here: {why}");
        }
        fn shutdown(&mut self, _: &mut Arena, _: Duration) {}
    }

    #[test]
    fn a_participant_dropped_while_a_version_is_released_is_left_out_not_a_crash() {
        let cfg = ServerConfig {
            mode: BarrierMode::Naive,
            rounds: Some(2),
            ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![4])
        };
        let arena = Arena::new(2, parts_of(&cfg).unwrap()).unwrap();
        let push = |rank, clock| Event::Pushed {
            rank,
            key: 0,
            clock,
        };
        let script = VecDeque::from(vec![
            vec![Event::Joined { rank: 0 }, Event::Joined { rank: 1 }],
            vec![push(0, 0), push(1, 0)],
            // Round 1 finds both versions being read: releasing one drops worker 1.
            vec![push(0, 1), push(1, 1)],
        ]);
        let transport = Scripted {
            script,
            sends: Vec::new(),
            victim: 1,
        };
        let server = Server::new(transport, arena, cfg).unwrap();
        let report = server.run(&AtomicBool::new(false)).unwrap();
        assert_eq!(report.stats.rounds, 2);
        assert_eq!(
            report.stats.participants,
            2 + 1,
            "round 1 went on without worker 1"
        );
    }

    #[test]
    fn stop_is_seen_even_before_any_worker_joins() {
        let (server, _) = Server::bind(ServerConfig {
            mode: BarrierMode::Naive,
            transport: Choice::Tcp,
            ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, vec![8, 3])
        })
        .unwrap();
        let stop = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| tx.send(server.run(&stop)).unwrap());
            std::thread::sleep(Duration::from_millis(150));
            stop.store(true, Ordering::Relaxed);
            // A bound that only catches a hang: the loop wakes at least every 100 ms.
            let report = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("server ignored stop");
            let report = report.unwrap();
            assert!(!report.started);
            assert_eq!(report.stats.rounds, 0);
        });
    }
}
