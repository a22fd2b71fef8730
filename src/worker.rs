//! A simulated worker with a real objective, so results can be checked in closed form, on top of
//! the worker API ([`crate::client`]).
//!
//! Worker `r` minimises `0.5 * |model_k - target_{r,k}|^2` for every tensor `k`: its gradient is
//! `model_k - target_{r,k}`, with a fixed target per rank and tensor drawn from a seeded generator
//! ([`target`]). Averaged over all workers each tensor converges to its mean target; with SGD at
//! rate `lr` and every worker in every round, after `n` rounds from zero it is exactly
//! `mean * (1 - (1 - lr)^n)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hetsync_transport::any::{Choice, RdmaSelect};
use hetsync_transport::auth::Secret;

use crate::client::{Client, ConnectOptions, LinkError, Status};
use crate::Rank;
use hetsync_transport::PeerError;

/// How a simulated worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The server's `HOST:PORT`.
    pub server: String,
    /// This worker's rank.
    pub rank: Rank,
    /// Workers in the job, when known (0: let the server check the rank).
    pub workers: u32,
    /// Elements (f32) of each tensor, in key order.
    pub dims: Vec<usize>,
    /// Stop after this many pushes (else run until the server says goodbye).
    pub rounds: Option<u64>,
    /// Simulated compute time per step.
    pub compute: Duration,
    /// When set, this worker is a straggler and computes this long instead...
    pub straggle: Option<Duration>,
    /// ...at every step (1.0, persistent) or at each step with this probability (transient),
    /// drawn from `seed` and the rank.
    pub straggle_prob: f64,
    /// Seed of the targets.
    pub seed: u64,
    /// How long to keep retrying the connection while the server is not up yet.
    pub connect_wait: Duration,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
    /// The job's shared secret, when the server authenticates workers.
    pub secret: Option<Secret>,
    /// Reconnect when the connection to the server is lost (not when it refuses the worker).
    pub reconnect: bool,
    /// How long a wait for a model polls before it sleeps ([`ConnectOptions::spin`]).
    pub spin: Duration,
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Steps taken (each pushes every tensor).
    pub pushes: u64,
    /// Round of the last model received (the oldest over tensors).
    pub last_round: u64,
    /// Whether the server ended the run (rather than the worker's own round limit or `stop`).
    pub server_finished: bool,
    /// Times the connection was lost and made again.
    pub reconnects: u64,
}

/// The target of worker `rank` for tensor `key`: `dim` values in [-1, 1), fixed by `seed`.
pub fn target(rank: Rank, key: usize, dim: usize, seed: u64) -> Vec<f32> {
    // Tensor 0 keeps the stream a one-tensor job always had.
    let mut state = seed
        ^ (u64::from(rank) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (key as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
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

/// The mean of the targets of ranks `0..workers` for tensor `key`: where it converges when
/// everyone takes part.
pub fn mean_target(workers: u32, key: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut sum = vec![0f64; dim];
    for r in 0..workers {
        for (s, t) in sum.iter_mut().zip(target(r, key, dim, seed)) {
            *s += f64::from(t);
        }
    }
    sum.iter()
        .map(|s| (s / f64::from(workers)) as f32)
        .collect()
}

/// The compute time of each step: normal, or slow as the straggler settings say.
#[derive(Debug)]
struct Steps {
    compute: Duration,
    straggle: Option<Duration>,
    prob: f64,
    state: u64,
}

impl Steps {
    fn new(cfg: &WorkerConfig) -> Self {
        Self {
            compute: cfg.compute,
            straggle: cfg.straggle,
            prob: cfg.straggle_prob,
            state: cfg.seed ^ (u64::from(cfg.rank) + 1).wrapping_mul(0xa076_1d64_78bd_642f),
        }
    }

    fn next(&mut self) -> Duration {
        let Some(slow) = self.straggle else {
            return self.compute;
        };
        if self.prob >= 1.0 {
            return slow;
        }
        // splitmix64, uniform in [0, 1).
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if ((z >> 11) as f64 / (1u64 << 53) as f64) < self.prob {
            slow
        } else {
            self.compute
        }
    }
}

/// Connects to the server over the transport `cfg` chooses (the line saying which, and why, is
/// [`Client::transport`]).
pub fn connect(cfg: &WorkerConfig) -> Result<Client, LinkError> {
    Client::connect(&ConnectOptions {
        server: cfg.server.clone(),
        rank: cfg.rank,
        workers: cfg.workers,
        dims: cfg.dims.clone(),
        connect_wait: cfg.connect_wait,
        transport: cfg.transport,
        rdma: cfg.rdma.clone(),
        secret: cfg.secret.clone(),
        spin: cfg.spin,
    })
}

/// Whether a link error means the connection to the server was lost (rather than refused or
/// broken by a protocol violation): worth reconnecting.
fn lost(e: &LinkError) -> bool {
    matches!(
        e,
        LinkError::Peer(PeerError::Closed { .. } | PeerError::Io { .. })
    )
}

/// Runs the worker loop: wait for the models, compute every tensor's gradient, push them all
/// (pipelined), repeat. With `cfg.reconnect`, a lost connection (the server died or restarts
/// from a checkpoint) is reconnected, retrying for `connect_wait`, and the loop goes on from the
/// model the server then sends.
pub fn run(
    cfg: &WorkerConfig,
    mut client: Client,
    stop: &AtomicBool,
) -> Result<WorkerReport, LinkError> {
    let targets: Vec<Vec<f32>> = cfg
        .dims
        .iter()
        .enumerate()
        .map(|(k, &d)| target(cfg.rank, k, d, cfg.seed))
        .collect();
    let mut steps = Steps::new(cfg);
    let mut report = WorkerReport::default();
    loop {
        match session(cfg, &mut client, stop, &targets, &mut steps, &mut report) {
            Err(e) if cfg.reconnect && lost(&e) && !stop.load(Ordering::Relaxed) => {
                report.reconnects += 1;
                client = reconnect(cfg, stop)?;
            }
            other => return other.map(|()| report),
        }
    }
}

/// Whether a refusal met while reconnecting may pass: the server is crowded with connections
/// still in their handshake, or has not yet seen this rank's old connection die.
fn transient(e: &LinkError) -> bool {
    matches!(e, LinkError::Refused { reason, .. }
        if ["too many connections", "no complete handshake", "is already connected"]
            .iter()
            .any(|r| reason.contains(r)))
}

/// Connects again after the connection was lost. A connection that is lost again during the
/// handshake (e.g. accepted into a dying server's backlog, then reset), or refused for a reason
/// that passes ([`transient`]), is retried too, with back-off, for `connect_wait` in all.
fn reconnect(cfg: &WorkerConfig, stop: &AtomicBool) -> Result<Client, LinkError> {
    let deadline = std::time::Instant::now() + cfg.connect_wait;
    let mut pause = Duration::from_millis(50);
    loop {
        match connect(cfg) {
            Err(e)
                if (lost(&e) || transient(&e))
                    && std::time::Instant::now() < deadline
                    && !stop.load(Ordering::Relaxed) =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// One connection's worth of [`run`].
fn session(
    cfg: &WorkerConfig,
    client: &mut Client,
    stop: &AtomicBool,
    targets: &[Vec<f32>],
    steps: &mut Steps,
    report: &mut WorkerReport,
) -> Result<(), LinkError> {
    let last_round = |c: &Client| (0..targets.len()).map(|k| c.round(k)).min().unwrap_or(0);
    if client.wait_all()? == Status::Shutdown {
        report.server_finished = true;
        return Ok(());
    }
    report.last_round = last_round(client);
    loop {
        if cfg.rounds.is_some_and(|k| report.pushes >= k) || stop.load(Ordering::Relaxed) {
            return client.bye_and_stay();
        }
        let compute = steps.next();
        if !compute.is_zero() {
            std::thread::sleep(compute);
        }
        // The gradient of 0.5 * |model - target|^2, written straight into the link's buffers
        // part by part, each part pushed as soon as it is computed.
        let status = client.step_with(|key, elems, model, grad| {
            for ((g, m), t) in grad.iter_mut().zip(model).zip(&targets[key][elems]) {
                *g = m - t;
            }
        })?;
        report.pushes += 1;
        if status == Status::Shutdown {
            report.server_finished = true;
            return Ok(());
        }
        report.last_round = last_round(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_pass_are_retried_on_reconnect() {
        let refused = |reason: &str| LinkError::Refused {
            peer: "s".into(),
            reason: reason.into(),
        };
        assert!(transient(&refused(
            "too many connections without a handshake (the 256 allowed; the oldest goes)"
        )));
        assert!(transient(&refused(
            "rank 3 is already connected (each worker needs its own --rank)"
        )));
        assert!(!transient(&refused("authentication failed: wrong secret")));
        assert!(!transient(&refused(
            "evicted: the others waited 3.0 s for its push"
        )));
        assert!(!transient(&refused(
            "tensor size mismatch: tensor 0 has 5 floats"
        )));
    }

    #[test]
    fn targets_are_fixed_by_seed_and_rank_and_bounded() {
        assert_eq!(target(1, 0, 100, 7), target(1, 0, 100, 7));
        assert_ne!(target(1, 0, 100, 7), target(2, 0, 100, 7));
        assert_ne!(target(1, 0, 100, 7), target(1, 0, 100, 8));
        assert_ne!(target(1, 0, 100, 7), target(1, 1, 100, 7));
        let t = target(3, 2, 10_000, 42);
        assert!(t.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = t.iter().map(|&x| f64::from(x)).sum::<f64>() / t.len() as f64;
        assert!(mean.abs() < 0.05, "targets are not centred: {mean}");
    }

    #[test]
    fn transient_stragglers_are_slow_at_about_the_given_share_of_steps() {
        let cfg = |rank, prob| WorkerConfig {
            server: String::new(),
            rank,
            workers: 4,
            dims: vec![1],
            rounds: None,
            compute: Duration::from_millis(20),
            straggle: Some(Duration::from_millis(200)),
            straggle_prob: prob,
            seed: 1,
            connect_wait: Duration::ZERO,
            transport: Choice::Tcp,
            rdma: RdmaSelect::default(),
            secret: None,
            reconnect: false,
            spin: Duration::ZERO,
        };
        let slow = |rank, prob| {
            let mut s = Steps::new(&cfg(rank, prob));
            (0..10_000)
                .filter(|_| s.next() > Duration::from_millis(20))
                .count()
        };
        assert_eq!(slow(0, 1.0), 10_000);
        assert_eq!(slow(0, 0.0), 0);
        let (a, b) = (slow(0, 0.25), slow(1, 0.25));
        assert!(
            (2300..2700).contains(&a) && (2300..2700).contains(&b),
            "{a} {b}"
        );
        let mut s0 = Steps::new(&cfg(0, 0.25));
        let mut s1 = Steps::new(&cfg(1, 0.25));
        let (x, y): (Vec<_>, Vec<_>) = (0..64).map(|_| (s0.next(), s1.next())).unzip();
        assert_ne!(x, y, "ranks draw their own schedules");
    }
}
