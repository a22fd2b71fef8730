//! The parameter server: transport events go to the sync policy, its actions to the engine and
//! back out through the transport. Single-threaded; all waiting happens in [`Transport::poll`].

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetsync_transport::any::{AnyServer, Choice, RdmaSelect};
use hetsync_transport::tcp::TcpServerConfig;
use hetsync_transport::{Event, Transport, TransportError};
use serde::Serialize;

use crate::engine::{Kernel, Sgd};
use crate::sync::{Action, Barrier, BarrierMode, CloseCause};

/// The only key the server runs today; the protocol and region already carry several.
const KEY: u32 = 0;
/// Longest single wait in the event loop: how quickly `stop` is noticed without a signal.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// How long shutdown waits for workers to take their goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// Workers in the job.
    pub workers: usize,
    /// Elements (f32) of the model.
    pub dim: usize,
    /// When rounds close.
    pub mode: BarrierMode,
    /// SGD learning rate.
    pub lr: f32,
    /// Stop after this many rounds.
    pub rounds: Option<u64>,
    /// Stop this long after training starts (every worker joined).
    pub duration: Option<Duration>,
    /// Print a progress line to stderr this often.
    pub progress: Option<Duration>,
    /// Log joins, departures and refusals to stderr.
    pub log_events: bool,
    /// Write one JSON line per closed round here.
    pub round_log: Option<PathBuf>,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
}

/// Counters of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// Rounds closed.
    pub rounds: u64,
    /// Gradients aggregated, summed over rounds.
    pub participants: u64,
    /// Workers missing from closed rounds, summed over rounds (stragglers left behind).
    pub stragglers: u64,
    /// Late gradients dropped.
    pub late_dropped: u64,
    /// Rounds closed by the timeout rather than by everyone arriving.
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
    /// The final model.
    pub model: Vec<f32>,
    /// The aggregation kernel used.
    pub kernel: Kernel,
}

impl ServerReport {
    /// Rounds closed per second of training.
    pub fn rounds_per_sec(&self) -> f64 {
        self.stats.rounds as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Mean gradients per closed round.
    pub fn mean_participants(&self) -> f64 {
        self.stats.participants as f64 / (self.stats.rounds.max(1)) as f64
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
        source: io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

#[derive(Serialize)]
struct RoundRecord<'a> {
    round: u64,
    participants: &'a [u32],
    missing: usize,
    cause: &'static str,
    t_ms: f64,
}

/// Progress since the last progress line.
#[derive(Debug)]
struct Window {
    at: Instant,
    rounds: u64,
    participants: u64,
}

/// A parameter server driving transport `T`.
#[derive(Debug)]
pub struct Server<T: Transport> {
    transport: T,
    barrier: Barrier,
    sgd: Sgd,
    kernel: Kernel,
    cfg: ServerConfig,
    stats: ServerStats,
    started: Option<Instant>,
    round_log: Option<BufWriter<File>>,
}

impl Server<AnyServer> {
    /// Binds the transport `cfg` chooses; also returns a line saying which one and why.
    pub fn bind(cfg: ServerConfig) -> Result<(Self, String), ServerError> {
        let (transport, why) = AnyServer::bind(
            &TcpServerConfig {
                listen: cfg.listen,
                workers: cfg.workers,
                dims: vec![cfg.dim],
            },
            cfg.transport,
            &cfg.rdma,
        )?;
        Ok((Self::new(transport, cfg)?, why))
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }
}

impl<T: Transport> Server<T> {
    /// A server over an already bound transport.
    pub fn new(transport: T, cfg: ServerConfig) -> Result<Self, ServerError> {
        if cfg.workers == 0 || cfg.dim == 0 {
            return Err(ServerError::Config(
                "--workers and --dim must be at least 1".into(),
            ));
        }
        if !cfg.lr.is_finite() || cfg.lr <= 0.0 {
            return Err(ServerError::Config(format!(
                "learning rate {} must be a positive number",
                cfg.lr
            )));
        }
        let round_log = match &cfg.round_log {
            Some(path) => Some(BufWriter::new(File::create(path).map_err(|source| {
                ServerError::RoundLog {
                    path: path.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        Ok(Self {
            transport,
            barrier: Barrier::new(cfg.mode, cfg.workers),
            sgd: Sgd { lr: cfg.lr },
            kernel: Kernel::best(),
            cfg,
            stats: ServerStats::default(),
            started: None,
            round_log,
        })
    }

    /// Serves until the round limit, the duration, or `stop` (seen within 100 ms, at once when a
    /// signal interrupts the wait).
    pub fn run(mut self, stop: &AtomicBool) -> Result<ServerReport, ServerError> {
        let mut events = Vec::new();
        let mut window: Option<Window> = None;
        let mut done = false;
        while !done && !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.barrier.handle_timeout(now);
            done = self.perform(now)?;
            if let (Some(t0), Some(d)) = (self.started, self.cfg.duration) {
                done |= now >= t0 + d;
            }
            if done {
                break;
            }
            let mut wake = self.barrier.poll_timeout();
            if let (Some(t0), Some(d)) = (self.started, self.cfg.duration) {
                wake = Some(wake.map_or(t0 + d, |w| w.min(t0 + d)));
            }
            if let (Some(every), Some(t0)) = (self.cfg.progress, self.started) {
                let w = window.get_or_insert(Window {
                    at: t0,
                    rounds: 0,
                    participants: 0,
                });
                if now >= w.at + every {
                    self.print_progress(w, now);
                }
                wake = Some(wake.map_or(w.at + every, |x| x.min(w.at + every)));
            }
            // Never sleep longer than STOP_CHECK, so an in-process `stop` is seen even before any
            // worker has joined (signals interrupt the wait anyway).
            let timeout = wake.map_or(STOP_CHECK, |w| {
                w.saturating_duration_since(now).min(STOP_CHECK)
            });
            self.transport.poll(&mut events, Some(timeout))?;
            let now = Instant::now();
            for ev in events.drain(..) {
                self.on_event(ev, now);
            }
            done = self.perform(now)?;
        }
        let end = Instant::now();
        if let Some(log) = self.round_log.as_mut() {
            log.flush().map_err(|source| ServerError::RoundLog {
                path: self.cfg.round_log.clone().unwrap_or_default(),
                source,
            })?;
        }
        let elapsed = self.started.map_or(Duration::ZERO, |t0| end - t0);
        let model = self.transport.region().model(KEY as usize).to_vec();
        self.transport.shutdown(SHUTDOWN_GRACE);
        Ok(ServerReport {
            started: self.started.is_some(),
            stats: self.stats,
            elapsed,
            model,
            kernel: self.kernel,
        })
    }

    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.cfg.log_events {
            eprintln!("hetsync server: {msg}");
        }
    }

    fn on_event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Joined { rank } => {
                self.stats.joins += 1;
                self.barrier.on_join(rank, now);
                let n = self.barrier.members();
                self.log(format_args!(
                    "worker {rank} joined ({n}/{} connected)",
                    self.cfg.workers
                ));
                if self.started.is_none() && self.barrier.started() {
                    self.started = Some(now);
                    self.log(format_args!(
                        "all {} workers joined: training starts ({} kernel, {} floats)",
                        self.cfg.workers,
                        self.kernel.name(),
                        self.cfg.dim
                    ));
                }
            }
            Event::Pushed { rank, key, clock } => {
                debug_assert_eq!(key, KEY, "the transport checks keys against the job");
                if let Err(e) = self.barrier.on_push(rank, clock, now) {
                    self.log(format_args!("dropping worker {rank}: {e}"));
                    self.transport.disconnect(rank, &e.to_string());
                }
            }
            Event::Left { rank, reason } => {
                self.stats.departures += 1;
                self.barrier.on_leave(rank, now);
                self.log(format_args!("worker {rank} left: {reason}"));
            }
            Event::Refused { peer, reason } => {
                self.stats.refused += 1;
                self.log(format_args!("refused {peer}: {reason}"));
            }
        }
    }

    /// Performs the policy's actions; returns whether the round limit was reached.
    fn perform(&mut self, now: Instant) -> Result<bool, ServerError> {
        let mut done = false;
        while let Some(action) = self.barrier.poll_action() {
            match action {
                Action::CloseRound {
                    round,
                    participants,
                    missing,
                    cause,
                } => {
                    self.sgd
                        .apply(self.kernel, self.transport.region_mut(), KEY, &participants);
                    self.stats.rounds += 1;
                    self.stats.participants += participants.len() as u64;
                    self.stats.stragglers += missing as u64;
                    if cause == CloseCause::Timeout {
                        self.stats.timeouts += 1;
                    }
                    self.record(round, &participants, missing, cause, now)?;
                    done |= self.cfg.rounds.is_some_and(|r| self.stats.rounds >= r);
                }
                Action::Serve { rank } => {
                    self.transport.send_model(rank, KEY, self.barrier.round());
                }
                Action::DiscardLate { .. } => self.stats.late_dropped += 1,
            }
        }
        Ok(done)
    }

    fn record(
        &mut self,
        round: u64,
        participants: &[u32],
        missing: usize,
        cause: CloseCause,
        now: Instant,
    ) -> Result<(), ServerError> {
        let Some(log) = self.round_log.as_mut() else {
            return Ok(());
        };
        let rec = RoundRecord {
            round,
            participants,
            missing,
            cause: match cause {
                CloseCause::AllArrived => "all_arrived",
                CloseCause::Timeout => "timeout",
            },
            t_ms: self
                .started
                .map_or(0.0, |t0| (now - t0).as_secs_f64() * 1e3),
        };
        serde_json::to_writer(&mut *log, &rec)
            .map_err(io::Error::from)
            .and_then(|_| log.write_all(b"\n"))
            .map_err(|source| ServerError::RoundLog {
                path: self.cfg.round_log.clone().unwrap_or_default(),
                source,
            })
    }

    fn print_progress(&self, w: &mut Window, now: Instant) {
        let rounds = self.stats.rounds - w.rounds;
        let secs = (now - w.at).as_secs_f64();
        let mean = if rounds == 0 {
            0.0
        } else {
            (self.stats.participants - w.participants) as f64 / rounds as f64
        };
        eprintln!(
            "hetsync server: round {} | {:.1} rounds/s | participants {:.2}/{} | stragglers dropped {} | late gradients {} | workers {}/{}",
            self.stats.rounds,
            rounds as f64 / secs.max(1e-9),
            mean,
            self.cfg.workers,
            self.stats.stragglers,
            self.stats.late_dropped,
            self.barrier.members(),
            self.cfg.workers,
        );
        *w = Window {
            at: now,
            rounds: self.stats.rounds,
            participants: self.stats.participants,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn stop_is_seen_even_before_any_worker_joins() {
        let (server, _) = Server::bind(ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 2,
            dim: 8,
            mode: BarrierMode::Naive,
            lr: 0.1,
            rounds: None,
            duration: None,
            progress: None,
            log_events: false,
            round_log: None,
            transport: Choice::Tcp,
            rdma: RdmaSelect::default(),
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
