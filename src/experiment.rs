//! The straggler experiment of the Het-Sync paper, run for real on loopback: a server and N
//! worker threads over TCP, a fraction of them 10x slower, for each policy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hetsync_transport::any::{Choice, RdmaSelect};
use serde::Serialize;

use crate::server::{Server, ServerConfig, ServerError};
use crate::sync::BarrierMode;
use crate::worker::{self, WorkerConfig};

/// One configuration of the experiment.
#[derive(Debug, Clone)]
pub struct Trial {
    /// Workers in the job.
    pub workers: u32,
    /// Percentage of them that straggle (rounded to whole workers).
    pub stragglers_pct: u32,
    /// The server's policy.
    pub mode: BarrierMode,
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
    /// How many workers straggle: `round(workers * pct / 100)`.
    pub fn stragglers(&self) -> u32 {
        (self.workers * self.stragglers_pct + 50) / 100
    }
}

/// The measured outcome of one trial: one row of the results table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// `naive` or `timeout`.
    pub policy: String,
    /// Percentage of straggling workers.
    pub stragglers_pct: u32,
    /// Rounds closed (model updates) per second of training.
    pub updates_per_sec: f64,
    /// Rounds closed.
    pub rounds: u64,
    /// Mean gradients aggregated per round.
    pub mean_participants: f64,
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

/// The policy's name as printed and written to JSON.
pub fn policy_name(mode: BarrierMode) -> &'static str {
    match mode {
        BarrierMode::Naive => "naive",
        BarrierMode::Timeout(_) => "timeout",
    }
}

/// Runs one trial on a free loopback port, calling `tick` with the time elapsed about every
/// 100 ms (for a progress bar).
pub fn run_trial(trial: &Trial, tick: &mut dyn FnMut(Duration)) -> Result<Row, TrialError> {
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let (server, _) = Server::bind(ServerConfig {
        mode: trial.mode,
        lr: trial.lr,
        duration: Some(trial.duration),
        transport: Choice::Tcp,
        ..ServerConfig::new(listen, trial.workers as usize, vec![trial.dim])
    })?;
    let addr = server.local_addr().to_string();
    let stop = AtomicBool::new(false);
    let stragglers = trial.stragglers();
    let started = Instant::now();
    thread::scope(|s| {
        let server = s.spawn(|| server.run(&stop));
        let workers: Vec<_> = (0..trial.workers)
            .map(|rank| {
                let cfg = WorkerConfig {
                    server: addr.clone(),
                    rank,
                    workers: trial.workers,
                    dims: vec![trial.dim],
                    rounds: None,
                    compute: trial.compute,
                    straggle: (rank < stragglers).then_some(trial.straggle),
                    seed: 1,
                    connect_wait: Duration::from_secs(10),
                    transport: Choice::Tcp,
                    rdma: RdmaSelect::default(),
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
        Ok(Row {
            policy: policy_name(trial.mode).to_string(),
            stragglers_pct: trial.stragglers_pct,
            updates_per_sec: report.rounds_per_sec(),
            rounds: report.stats.rounds,
            mean_participants: report.mean_participants(),
        })
    })
}
