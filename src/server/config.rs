//! What the server is told (its configuration) and what it tells back (counters, report,
//! errors).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hetsync_transport::any::{Choice, RdmaSelect};
use hetsync_transport::auth::Secret;
use hetsync_transport::TransportError;
use serde::Serialize;

use super::LateMode;
use crate::engine::Kernel;
use crate::sync::SyncMode;

/// The partition size when none is given: 512 KiB. Measured on a 2-vCPU VM over loopback TCP, one
/// worker pushing and pulling one tensor with the pipelined worker link (3 interleaved runs per
/// size, GB/s): at 1 MiB, parts of 1 MiB 0.9-1.3, 512 KiB 2.2-3.1, 256 KiB 1.6-2.3; at 16 MiB
/// and 64 MiB, 512 KiB and 256 KiB within each other's spread and ahead of 1 MiB by 1.2-1.4x.
/// Below the tensor's size a part lets the server sum and answer part i while part i+1 arrives;
/// 512 KiB keeps the number of parts (policies, frames, RDMA work requests) half that of 256 KiB.
pub const DEFAULT_PARTITION_BYTES: usize = 512 << 10;

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
    /// The synchronisation policy.
    pub mode: SyncMode,
    /// What a barrier policy does with a gradient that missed its round.
    pub late: LateMode,
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
    /// Write every event (rounds closed, pushes applied, reads served, late gradients) here,
    /// one JSON line each.
    pub trace: Option<PathBuf>,
    /// Write the final model here (every tensor in key order, raw little-endian f32).
    pub save_model: Option<PathBuf>,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
    /// How long a connection may take to join (its hello, and over RDMA its offer).
    pub handshake_timeout: Duration,
    /// How long a peer's queued output may make no progress before it is dropped.
    pub write_timeout: Duration,
    /// How long the event loop polls before it sleeps (zero never spins; see
    /// [`hetsync_transport::default_spin`]).
    pub spin: Duration,
    /// The job's shared secret: workers must prove they know it before they are admitted.
    pub secret: Option<Secret>,
    /// Start training this long after the first worker joined, with the workers present
    /// (`None`: wait for all).
    pub start_after: Option<Duration>,
    /// Drop a worker that everyone has waited for this long (`None`: never).
    pub evict_after: Option<Duration>,
    /// Write a crash-safe checkpoint here every `checkpoint_every` job rounds, and at the end.
    pub checkpoint: Option<PathBuf>,
    /// Job rounds (or clocks) between checkpoints.
    pub checkpoint_every: u64,
    /// Continue from this checkpoint (the model bit for bit, every part's round and clock).
    pub resume: Option<PathBuf>,
    /// The model to start from: every tensor in key order, concatenated (`None`: zeros). A
    /// checkpoint to resume from takes precedence.
    pub init_model: Option<Vec<f32>>,
}

impl ServerConfig {
    /// A job of `workers` workers and tensors of `dims` floats on `listen`, with the defaults of
    /// `hetsync server`: the timeout barrier at 10 ms folding late gradients in, learning rate
    /// 0.1, 512 KiB parts, no round limit, quiet, the transport chosen automatically, 10 s to
    /// join and 60 s of write deadline.
    pub fn new(listen: SocketAddr, workers: usize, dims: Vec<usize>) -> Self {
        Self {
            listen,
            workers,
            dims,
            partition_bytes: DEFAULT_PARTITION_BYTES,
            mode: SyncMode::timeout(Duration::from_millis(10)),
            late: LateMode::Fold,
            lr: 0.1,
            rounds: None,
            duration: None,
            progress: None,
            log_events: false,
            round_log: None,
            trace: None,
            save_model: None,
            transport: Choice::Auto,
            rdma: RdmaSelect::default(),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: hetsync_transport::channel::DEFAULT_WRITE_TIMEOUT,
            spin: hetsync_transport::default_spin(),
            secret: None,
            start_after: None,
            evict_after: None,
            checkpoint: None,
            checkpoint_every: 10,
            resume: None,
            init_model: None,
        }
    }
}

/// Counters of a run. Rounds are key rounds: a key's round closes once all its parts closed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    /// The job's steps: rounds every key has closed (barrier), or clocks every worker has
    /// completed on every key (vector clock).
    pub rounds: u64,
    /// Key rounds closed, summed over keys (barrier).
    pub key_rounds: u64,
    /// Gradients aggregated on time (in every part of their key), summed over key rounds
    /// (barrier).
    pub participants: u64,
    /// Gradients that reached the model: on time or folded (barrier), or applied as they came
    /// (vector clock); one per worker and key.
    pub pushes_applied: u64,
    /// Workers missing from closed key rounds, summed (stragglers left behind).
    pub stragglers: u64,
    /// Late gradients folded into a later round (one per worker, key and round).
    pub late_folded: u64,
    /// Gradients that never reached the model: late ones under `--late drop`, and those whose
    /// worker left before their round closed (one per worker, key and round).
    pub dropped: u64,
    /// Key rounds in which some part closed by the timeout rather than by everyone arriving.
    pub timeouts: u64,
    /// Workers that joined (including rejoins).
    pub joins: u64,
    /// Workers that left or were dropped.
    pub departures: u64,
    /// Connections refused at the handshake.
    pub refused: u64,
    /// Workers dropped because everyone waited too long for them (`--evict-after-ms`).
    pub evicted: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Refused connections by kind of reason (handshake_timeout, pending_full, authentication,
    /// rank_held, wrong_job, accept_failed, protocol, other).
    pub refused_by_reason: std::collections::BTreeMap<String, u64>,
    /// The job round the run resumed from (0 when it did not)
    pub resumed_at: u64,
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

    /// Gradients (of a key) that reached the model per second of training.
    pub fn pushes_applied_per_sec(&self) -> f64 {
        self.stats.pushes_applied as f64 / self.elapsed.as_secs_f64().max(1e-9)
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
    /// The trace or the round log could not be written.
    #[error("writing the trace {path}: {source}")]
    Trace {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint could not be written or resumed from.
    #[error(transparent)]
    Checkpoint(#[from] super::checkpoint::CheckpointError),
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
