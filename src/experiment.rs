//! The straggler experiments of both seeds, run for real on loopback: a server and N worker
//! threads over TCP for each policy, with persistent stragglers (a share of the workers 10x
//! slower at every step: the Het-Sync paper) or transient ones (every step of every worker 10x
//! slower with that probability: the case Angel's SSP is for).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hetsync_transport::any::{Choice, RdmaSelect};
use serde::Serialize;

use crate::server::{LateMode, Server, ServerConfig, ServerError};
use crate::sync::SyncMode;
use crate::worker::{self, WorkerConfig};

/// How stragglers behave in a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stragglers {
    /// `pct`% of the workers (rounded) are slow at every step.
    Persistent,
    /// Every step of every worker is slow with probability `pct`%.
    Transient,
}

/// One configuration of the experiment.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Workers in the job.
    pub workers: u32,
    /// The share of stragglers in percent: of the workers (persistent, rounded to whole
    /// workers) or of every worker's steps (transient).
    pub stragglers_pct: u32,
    /// How stragglers behave.
    pub stragglers_mode: Stragglers,
    /// The server's policy.
    pub mode: SyncMode,
    /// What barrier policies do with late gradients.
    pub late: LateMode,
    /// A normal worker's compute time per step.
    pub compute: Duration,
    /// A straggler's compute time per step.
    pub straggle: Duration,
    /// How long to train.
    pub duration: Duration,
    /// Elements of the model.
    pub dim: usize,
    /// Learning rate.
    pub lr: f32,
}

impl Trial {
    /// How many workers straggle at every step (persistent): `round(workers * pct / 100)`.
    pub fn stragglers(&self) -> u32 {
        (self.workers * self.stragglers_pct + 50) / 100
    }

    fn straggler(&self, rank: u32) -> (Option<Duration>, f64) {
        match self.stragglers_mode {
            Stragglers::Persistent => ((rank < self.stragglers()).then_some(self.straggle), 1.0),
            Stragglers::Transient => (
                (self.stragglers_pct > 0).then_some(self.straggle),
                f64::from(self.stragglers_pct) / 100.0,
            ),
        }
    }
}

/// The measured outcome of one trial: one row of the results table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `naive`, `timeout`, `adaptive`, `bsp`, `ssp` or `asp`.
    pub policy: String,
    /// How stragglers behaved.
    pub straggler_mode: Stragglers,
    /// The share of stragglers in percent.
    pub stragglers_pct: u32,
    /// Model updates per second of training: rounds closed per second (barrier), or pushes
    /// applied per second divided by the workers (vector clock: one push from each worker moves
    /// the model as one naive round does).
    pub updates_per_sec: f64,
    /// Gradients that reached the model per second (on time, folded, or applied).
    pub pushes_applied_per_sec: f64,
    /// Rounds closed (barrier) or the slowest worker's clock (vector clock).
    pub rounds: u64,
    /// Mean gradients aggregated on time per round (barrier; 0 for vector clocks).
    pub mean_participants: f64,
    /// Late gradients folded into later rounds.
    pub folded: u64,
    /// Gradients that never reached the model.
    pub dropped: u64,
}

/// A failed trial.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// The server failed.
    #[error("server: {0}")]
    Server(#[from] ServerError),
    /// A worker failed.
    #[error("worker {rank}: {source}")]
    Worker {
        /// The worker.
        rank: u32,
        /// What happened.
        #[source]
        source: hetsync_transport::LinkError,
    },
    /// A thread panicked.
    #[error("{0} thread panicked")]
    Panic(&'static str),
}

/// Runs one trial on a free loopback port, calling `tick` with the time elapsed about every
/// 100 ms (for a progress bar).
pub fn run_trial(trial: &Trial, tick: &mut dyn FnMut(Duration)) -> Result<Row, TrialError> {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let (server, _) = Server::bind(ServerConfig {
        mode: trial.mode,
        late: trial.late,
        lr: trial.lr,
        duration: Some(trial.duration),
        transport: Choice::Tcp,
        spin: Duration::ZERO,
        ..ServerConfig::new(listen, trial.workers as usize, vec![trial.dim])
    })?;
    let addr = server.local_addr().to_string();
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    thread::scope(|s| {
        let server = s.spawn(|| server.run(&stop));
        let workers: Vec<_> = (0..trial.workers)
            .map(|rank| {
                let (straggle, straggle_prob) = trial.straggler(rank);
                let cfg = WorkerConfig {
                    server: addr.clone(),
                    rank,
                    workers: trial.workers,
                    dims: vec![trial.dim],
                    rounds: None,
                    compute: trial.compute,
                    straggle,
                    straggle_prob,
                    seed: 1,
                    connect_wait: Duration::from_secs(10),
                    transport: Choice::Tcp,
                    rdma: RdmaSelect::default(),
                    secret: None,
                    reconnect: false,
                    // More threads than cores here: spinning would only slow the others.
                    spin: Duration::ZERO,
                };
                let stop = &stop;
                s.spawn(move || {
                    worker::connect(&cfg).and_then(|client| worker::run(&cfg, client, stop))
                })
            })
            .collect();
        while !server.is_finished() {
            // A worker that ends while the server runs has failed (workers end after the
            // server's goodbye): stop the trial rather than wait for a worker that will not come.
            if workers.iter().any(|w| w.is_finished()) {
                stop.store(true, Ordering::Relaxed);
            }
            tick(started.elapsed());
            thread::sleep(Duration::from_millis(100));
        }
        let report = server.join().map_err(|_| TrialError::Panic("server"))??;
        for (rank, w) in workers.into_iter().enumerate() {
            w.join()
                .map_err(|_| TrialError::Panic("worker"))?
                .map_err(|source| TrialError::Worker {
                    rank: rank as u32,
                    source,
                })?;
        }
        let applied = report.pushes_applied_per_sec();
        Ok(Row {
            policy: trial.mode.name().to_string(),
            straggler_mode: trial.stragglers_mode,
            stragglers_pct: trial.stragglers_pct,
            updates_per_sec: if trial.mode.is_clocked() {
                applied / f64::from(trial.workers)
            } else {
                report.rounds_per_sec()
            },
            pushes_applied_per_sec: applied,
            rounds: report.stats.rounds,
            mean_participants: if trial.mode.is_clocked() {
                0.0
            } else {
                report.mean_participants()
            },
            folded: report.stats.late_folded,
            dropped: report.stats.dropped,
        })
    })
}
