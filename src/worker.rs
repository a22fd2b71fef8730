//! A simulated worker with a real objective, so results can be checked in closed form.
//!
//! Worker `r` minimises `0.5 * |model - target_r|^2`: its gradient is `model - target_r`, with a
//! fixed target per rank drawn from a seeded generator ([`target`]). Averaged over all workers the
//! model converges to the mean target; with SGD at rate `lr` and every worker in every round,
//! after `k` rounds from zero it is exactly `mean * (1 - (1 - lr)^k)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hetsync_transport::any::{AnyLink, Choice, RdmaSelect};
use hetsync_transport::protocol::Hello;
use hetsync_transport::{Incoming, LinkError, WorkerLink};

use crate::Rank;

/// How a simulated worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The server's `HOST:PORT`.
    pub server: String,
    /// This worker's rank.
    pub rank: Rank,
    /// Workers in the job, when known (0: let the server check the rank).
    pub workers: u32,
    /// Elements (f32) of the model.
    pub dim: usize,
    /// Stop after this many pushes (else run until the server says goodbye).
    pub rounds: Option<u64>,
    /// Simulated compute time per step.
    pub compute: Duration,
    /// When set, this worker is a straggler and computes this long instead.
    pub straggle: Option<Duration>,
    /// Seed of the targets.
    pub seed: u64,
    /// How long to keep retrying the connection while the server is not up yet.
    pub connect_wait: Duration,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Gradients pushed.
    pub pushes: u64,
    /// Round of the last model received.
    pub last_round: u64,
    /// Whether the server ended the run (rather than the worker's own round limit or `stop`).
    pub server_finished: bool,
}

/// The target vector of worker `rank`: `dim` values in [-1, 1), fixed by `seed`.
pub fn target(rank: Rank, dim: usize, seed: u64) -> Vec<f32> {
    let mut state = seed ^ (u64::from(rank) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..dim)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The mean of the targets of ranks `0..workers`: where the model converges when everyone takes part.
pub fn mean_target(workers: u32, dim: usize, seed: u64) -> Vec<f32> {
    let mut sum = vec![0f64; dim];
    for r in 0..workers {
        for (s, t) in sum.iter_mut().zip(target(r, dim, seed)) {
            *s += f64::from(t);
        }
    }
    sum.iter()
        .map(|s| (s / f64::from(workers)) as f32)
        .collect()
}

/// Connects to the server over the transport `cfg` chooses; returns the link and a line saying
/// which transport it uses and why.
pub fn connect(cfg: &WorkerConfig) -> Result<(AnyLink, String), LinkError> {
    let hello = Hello {
        rank: cfg.rank,
        workers: cfg.workers,
        dims: vec![cfg.dim as u64],
        rdma: false,
    };
    AnyLink::connect(
        &cfg.server,
        &hello,
        cfg.connect_wait,
        cfg.transport,
        &cfg.rdma,
    )
}

/// Runs the worker loop over any link: wait for the model, compute, push, repeat.
pub fn run<L: WorkerLink>(
    cfg: &WorkerConfig,
    link: &mut L,
    stop: &AtomicBool,
) -> Result<WorkerReport, LinkError> {
    let target = target(cfg.rank, cfg.dim, cfg.seed);
    let compute = cfg.straggle.unwrap_or(cfg.compute);
    let mut report = WorkerReport::default();
    let Incoming::Model { round, .. } = link.wait_model()? else {
        report.server_finished = true;
        return Ok(report);
    };
    report.last_round = round;
    loop {
        if cfg.rounds.is_some_and(|k| report.pushes >= k) || stop.load(Ordering::Relaxed) {
            link.bye()?;
            return Ok(report);
        }
        if !compute.is_zero() {
            std::thread::sleep(compute);
        }
        // The gradient of 0.5 * |model - target|^2, written straight into the link's buffer.
        let (model, grad) = link.model_and_gradient(0);
        for ((g, m), t) in grad.iter_mut().zip(model).zip(&target) {
            *g = m - t;
        }
        link.push(0, report.last_round)?;
        report.pushes += 1;
        match link.wait_model()? {
            Incoming::Model { round, .. } => report.last_round = round,
            Incoming::Shutdown => {
                report.server_finished = true;
                return Ok(report);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_fixed_by_seed_and_rank_and_bounded() {
        assert_eq!(target(1, 100, 7), target(1, 100, 7));
        assert_ne!(target(1, 100, 7), target(2, 100, 7));
        assert_ne!(target(1, 100, 7), target(1, 100, 8));
        let t = target(3, 10_000, 42);
        assert!(t.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = t.iter().map(|&x| f64::from(x)).sum::<f64>() / t.len() as f64;
        assert!(mean.abs() < 0.05, "targets are not centred: {mean}");
    }
}
