//! The `hetsync` command line: server, worker, bench and demo.

mod bench;
mod bench_aggregate;
mod bench_scale;
mod bench_transport;
mod plot;
mod run;
mod signals;

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::experiment::Stragglers;
use crate::server::LateMode;
use crate::sync::SyncMode;

/// A failure to report to the user, with its chain of causes.
pub type CliError = Box<dyn Error + Send + Sync>;

/// Het-Sync: a straggler-tolerant parameter server for distributed training.
///
/// Workers push gradients; the server sums them with SIMD, applies the update and returns the
/// model. With the `timeout` policy a round closes when every worker has pushed or a timeout
/// after the round's first push expires, so stragglers do not stall training.
#[derive(Debug, Parser)]
#[command(
    name = "hetsync",
    version,
    propagate_version = true,
    after_help = "Examples:
  hetsync demo                                   # the straggler experiment on loopback
  hetsync server --listen 0.0.0.0:7700 --workers 4 --dims 1048576,1024,10
  hetsync worker --server node1:7700 --rank 0 --dims 1048576,1024,10
  hetsync bench stragglers --seconds 3 --json out.json --plot out.png"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the parameter server.
    ///
    /// Listens for workers, starts training once all --workers have joined, and closes rounds
    /// according to --policy. Prints a progress line every second. Stops after --rounds (exit 0),
    /// or on SIGINT/SIGTERM, saying goodbye to every worker.
    Server(ServerArgs),
    /// Run a simulated worker.
    ///
    /// Worker R's gradient is `model - target_R` for a fixed target drawn from --seed, so the model
    /// converges to the mean target and results can be checked. Each step "computes" for
    /// --compute-ms (or --straggle-ms for a straggler), pushes, and waits for the model.
    Worker(WorkerArgs),
    /// Ask a running server how the job is doing.
    ///
    /// Policy, rounds or clocks per tensor, connected workers and their transport, counters
    /// (rounds, gradients on time / folded / dropped, refused connections by reason), uptime.
    /// With a job secret, pass the same --secret-file as the workers.
    Status(StatusArgs),
    /// Run benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run both seeds' straggler experiments and write their results.
    ///
    /// Four workers computing 20 ms per step, slow steps 200 ms (about 2.5 min in all). The
    /// Het-Sync table: persistent stragglers (0-75% of the workers always slow), naive against
    /// the timeout barrier and the adaptive timeout, both starting at 20 ms, --seconds per
    /// configuration. The Angel table: transient stragglers (each step slow with probability
    /// 0-50%), naive against BSP, SSP (staleness 3) and ASP, 3 x --seconds per configuration
    /// (random schedules need longer runs). Writes DIR/persistent.json, DIR/persistent.png,
    /// DIR/transient.json and DIR/transient.png.
    Demo(DemoArgs),
}

/// Which synchronisation policy the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Policy {
    /// Barrier: wait for every worker, forever; one straggler stalls the job (for comparison).
    Naive,
    /// Barrier: close a round when every worker pushed, or --timeout-ms after its first push.
    Timeout,
    /// Barrier: like timeout, the timeout learnt from recent rounds (starts at and never exceeds
    /// --timeout-ms); workers that are persistently slow are not waited for until they speed up.
    Adaptive,
    /// Vector clock, staleness 0: every push applied as it comes; a read at clock c waits until
    /// every worker has completed clock c - 1.
    Bsp,
    /// Vector clock, staleness --staleness N: a worker may run at most N clocks ahead of the
    /// slowest.
    Ssp,
    /// Vector clock, no bound: reads never wait.
    Asp,
}

/// What a barrier policy does with a gradient that missed its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LateArg {
    /// Add it into the next round's sum with weight 1/(1+s), s = rounds late.
    Fold,
    /// Discard it (counted).
    Drop,
}

impl From<LateArg> for LateMode {
    fn from(l: LateArg) -> Self {
        match l {
            LateArg::Fold => LateMode::Fold,
            LateArg::Drop => LateMode::Drop,
        }
    }
}

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TransportArg {
    /// RDMA when there is an active device (and the peer has one too), TCP otherwise.
    Auto,
    /// RDMA verbs, or a clear error when there is no device.
    Rdma,
    /// TCP only.
    Tcp,
}

impl From<TransportArg> for hetsync_transport::any::Choice {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => Self::Auto,
            TransportArg::Rdma => Self::Rdma,
            TransportArg::Tcp => Self::Tcp,
        }
    }
}

/// Transport options shared by the server and the worker.
#[derive(Debug, Args)]
struct TransportArgs {
    /// How data moves: RDMA verbs (one-sided writes into registered memory) or TCP.
    #[arg(long, value_enum, default_value_t = TransportArg::Auto)]
    transport: TransportArg,
    /// The RDMA device (default: the first one; `ibv_devices` lists them).
    #[arg(long, value_name = "NAME", env = "HETSYNC_RDMA_DEVICE")]
    rdma_device: Option<String>,
    /// The GID index (default: the RoCE v2 GID with an IPv4 address; `show_gids` lists them).
    #[arg(long, value_name = "N", env = "HETSYNC_GID_INDEX")]
    gid_index: Option<u8>,
    /// Microseconds a wait for the other side polls before it sleeps: a reply on its way is
    /// taken without a wake-up (tens of microseconds across cores). 0 never spins: use it when
    /// the job's processes outnumber the cores. Default: 50 with more than one CPU, else 0.
    #[arg(long, value_name = "US", env = "HETSYNC_SPIN_US", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    spin_us: Option<u32>,
}

impl TransportArgs {
    /// The spin the options ask for, or the default.
    fn spin(&self) -> Duration {
        self.spin_us
            .map_or_else(hetsync_transport::default_spin, |us| {
                Duration::from_micros(us.into())
            })
    }

    fn rdma(&self) -> hetsync_transport::any::RdmaSelect {
        hetsync_transport::any::RdmaSelect {
            device: self.rdma_device.clone(),
            gid_index: self.gid_index,
        }
    }
}

/// Authentication, shared by the server and the worker.
#[derive(Debug, Args)]
struct AuthArgs {
    /// A file holding the job's shared secret (at least 16 bytes; one final newline is ignored):
    /// server and worker prove to each other that they know it before a worker is admitted.
    /// cluster-scripts/hetsync.sbatch makes one per job.
    #[arg(long, value_name = "FILE", env = "HETSYNC_SECRET_FILE")]
    secret_file: Option<PathBuf>,
}

impl AuthArgs {
    /// Reads the secret, if a file was given, warning when others may read it.
    fn secret(&self, who: &str) -> Result<Option<hetsync_transport::auth::Secret>, CliError> {
        let Some(path) = &self.secret_file else {
            return Ok(None);
        };
        let (secret, warning) = hetsync_transport::auth::Secret::from_file(path)?;
        if let Some(w) = warning {
            eprintln!("hetsync {who}: warning: {w}");
        }
        Ok(Some(secret))
    }
}

/// The tensors of the job, shared by the server and the worker.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ModelArgs {
    /// Elements (f32) of each tensor, comma separated, in key order (a model's layers, say).
    /// Must be the same on the server and every worker.
    #[arg(long, value_name = "D1,D2,...", value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32)))]
    dims: Option<Vec<u64>>,
    /// Elements (f32) of a one-tensor model: the same as --dims D.
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u64).range(1..=(1u64 << 32)))]
    dim: Option<u64>,
}

impl ModelArgs {
    fn dims(&self) -> Result<Vec<usize>, CliError> {
        let dims = self
            .dims
            .clone()
            .or(self.dim.map(|d| vec![d]))
            .unwrap_or_default();
        if dims.len() > hetsync_transport::protocol::MAX_TENSORS {
            return Err(format!(
                "--dims lists {} tensors; a job may have at most {}",
                dims.len(),
                hetsync_transport::protocol::MAX_TENSORS
            )
            .into());
        }
        Ok(dims
            .into_iter()
            .map(usize::try_from)
            .collect::<Result<_, _>>()?)
    }
}

impl Policy {
    fn mode(self, timeout_ms: f64, staleness: u64) -> SyncMode {
        let t = Duration::from_secs_f64(timeout_ms / 1e3);
        let name = self.to_possible_value().expect("no policy is hidden");
        SyncMode::named(name.get_name(), t, staleness).expect("every policy has a name")
    }

    /// The policy and its parameters in words, for the server's first lines.
    fn describe(self, timeout_ms: f64, staleness: u64) -> String {
        match self {
            Policy::Naive => "naive (wait for every worker)".into(),
            Policy::Timeout => format!("timeout ({timeout_ms} ms after a round's first push)"),
            Policy::Adaptive => {
                format!("adaptive (timeout learnt from arrivals, starting at and capped by {timeout_ms} ms)")
            }
            Policy::Bsp => "bsp (vector clock, staleness 0)".into(),
            Policy::Ssp => format!("ssp (vector clock, staleness {staleness})"),
            Policy::Asp => "asp (vector clock, no staleness bound)".into(),
        }
    }
}

/// The default staleness of `--policy ssp`.
const DEFAULT_STALENESS: u64 = 3;

/// The options of `hetsync server` (its help text is on [`Command`]).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  hetsync server --workers 4 --dim 1048576
  hetsync server --workers 4 --dims 1048576,1024,10 --partition-kib 1024
  hetsync server --listen 127.0.0.1:0 --workers 2 --dim 1000 --policy naive --rounds 100
  hetsync server --workers 8 --dim 4096 --timeout-ms 5 --round-log rounds.jsonl --save-model model.f32
  hetsync server --workers 8 --dim 4096 --policy adaptive --timeout-ms 50 --late fold
  hetsync server --workers 8 --dim 4096 --policy ssp --staleness 3 --trace trace.jsonl")]
struct ServerArgs {
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, default_value = "0.0.0.0:7700", value_name = "ADDR")]
    listen: SocketAddr,
    /// Number of workers in the job (ranks 0..N-1). cluster-scripts/hetsync.sbatch sets
    /// HETSYNC_WORKERS for the server step.
    #[arg(long, value_name = "N", env = "HETSYNC_WORKERS", value_parser = clap::value_parser!(u32).range(1..=65536))]
    workers: u32,
    #[command(flatten)]
    model: ModelArgs,
    /// Largest part a tensor travels and synchronises in, in KiB: the server sums one part while
    /// the next is still arriving and answers each at once. Told to workers in the handshake.
    #[arg(long, value_name = "P", default_value_t = (crate::server::DEFAULT_PARTITION_BYTES / 1024) as u32, value_parser = clap::value_parser!(u32).range(1..=(1 << 20)))]
    partition_kib: u32,
    /// How workers synchronise: a round barrier (naive, timeout, adaptive) or a vector clock per
    /// part (bsp, ssp, asp).
    #[arg(long, value_enum, default_value_t = Policy::Timeout)]
    policy: Policy,
    /// With --policy timeout: how long after a round's first push it closes anyway (default
    /// 10). With --policy adaptive: where the learnt timeout starts, and its cap.
    #[arg(long, value_name = "MS", value_parser = positive_ms)]
    timeout_ms: Option<f64>,
    /// With --policy ssp: how many clocks a worker may run ahead of the slowest (default 3; at
    /// least 1: staleness 0 is --policy bsp).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    staleness: Option<u64>,
    /// With --policy timeout or adaptive: what happens to a gradient that missed its round
    /// (default fold).
    #[arg(long, value_enum)]
    late: Option<LateArg>,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1, value_name = "X")]
    lr: f32,
    /// Stop after every tensor has closed R rounds (vector clocks: once every worker has
    /// completed R clocks on every tensor), and exit 0.
    #[arg(long, value_name = "R")]
    rounds: Option<u64>,
    /// Seconds between progress lines (0: none).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    progress: f64,
    /// Do not log joins, departures and refusals.
    #[arg(long, short)]
    quiet: bool,
    /// Write one JSON line per closed round of each tensor (key, participants, folded late
    /// gradients, cause, time) to FILE: the round_closed lines of --trace.
    #[arg(long, value_name = "FILE")]
    round_log: Option<PathBuf>,
    /// Write every event to FILE, one JSON line each: round_closed, push_applied, pull_served
    /// (with the worker's clock and the slowest clock) and late gradients.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Write the final model to FILE: every tensor in key order, raw little-endian f32
    /// (numpy.fromfile(FILE, "<f4")), through a temporary file renamed over FILE.
    #[arg(long, value_name = "FILE")]
    save_model: Option<PathBuf>,
    /// Start training this long after the first worker joined, with the workers present (the
    /// others join when they come). Default: wait for all --workers.
    #[arg(long, value_name = "MS", value_parser = positive_ms)]
    start_after_ms: Option<f64>,
    /// Drop a worker that everyone has waited this long for (a dead or hung worker under naive
    /// or bsp), so the others go on; it may reconnect and rejoin. Default: never.
    #[arg(long, value_name = "MS", value_parser = positive_ms)]
    evict_after_ms: Option<f64>,
    /// Write a checkpoint of the model and every part's round and clock to FILE every
    /// --checkpoint-every rounds and at the end, so that a crash at any instant leaves the
    /// previous or the new one whole (two slots, checksummed, fsync'd).
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Rounds (vector clocks: clocks of the slowest worker) between checkpoints.
    #[arg(long, default_value_t = 10, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_every: u64,
    /// Continue from the newest whole checkpoint in FILE (the same job options): the model bit
    /// for bit, at its rounds; workers reconnect by themselves. Usually the --checkpoint file.
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    /// Start from the model in FILE instead of zeros: every tensor in key order, raw
    /// little-endian f32, as --save-model writes it (numpy: model.astype("<f4").tofile(FILE)).
    /// Ignored when --resume finds a checkpoint.
    #[arg(long, value_name = "FILE")]
    init_model: Option<PathBuf>,
    /// How long a connection may take from connecting to joining (its hello, and over RDMA its
    /// offer) before it is dropped.
    #[arg(long, default_value_t = 10_000.0, value_name = "MS", value_parser = positive_ms)]
    handshake_timeout_ms: f64,
    /// How long a worker may leave what the server sends it unread before it is dropped (keep
    /// it above the longest compute step between a push and the wait for its model).
    #[arg(long, default_value_t = 60_000.0, value_name = "MS", value_parser = positive_ms)]
    write_timeout_ms: f64,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    transport: TransportArgs,
}

/// The options of `hetsync status` (its help text is on [`Command`]).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  hetsync status --server node1:7700
  hetsync status --server node1:7700 --json --secret-file ~/.hetsync/secret-1234")]
struct StatusArgs {
    /// The server's HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// Print the report as JSON (one object) instead of a summary.
    #[arg(long)]
    json: bool,
    /// How long to wait for the server at each step.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    timeout: f64,
    #[command(flatten)]
    auth: AuthArgs,
}

/// The options of `hetsync worker` (its help text is on [`Command`]).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  hetsync worker --server 127.0.0.1:7700 --rank 0 --dim 1048576
  hetsync worker --server 127.0.0.1:7700 --rank 1 --dims 1048576,1024,10
  hetsync worker --server node1:7700 --rank 3 --dim 1048576 --straggle-ms 200 --rounds 100
  srun -n 4 hetsync worker --server node1:7700 --dim 1048576    # ranks from Slurm")]
struct WorkerArgs {
    /// The server's HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// This worker's rank, 0..N-1. Under `srun`, Slurm's task rank is used when absent.
    #[arg(long, value_name = "R", env = "SLURM_PROCID")]
    rank: u32,
    #[command(flatten)]
    model: ModelArgs,
    /// Number of workers in the job, checked against the server's when given. Under `srun`,
    /// Slurm's task count is used when absent.
    #[arg(long, value_name = "N", env = "SLURM_NTASKS")]
    workers: Option<u32>,
    /// Stop after K pushes (default: until the server finishes).
    #[arg(long, value_name = "K")]
    rounds: Option<u64>,
    /// Simulated compute time per step.
    #[arg(long, default_value_t = 20.0, value_name = "MS", value_parser = non_negative_ms)]
    compute_ms: f64,
    /// Make this worker a straggler that computes this long per step instead.
    #[arg(long, value_name = "MS", value_parser = non_negative_ms)]
    straggle_ms: Option<f64>,
    /// With --straggle-ms: the probability that a step is slow (1: every step, a persistent
    /// straggler; below 1: transient, drawn per step from --seed and the rank).
    #[arg(long, value_name = "P", default_value_t = 1.0, requires = "straggle_ms", value_parser = probability)]
    straggle_prob: f64,
    /// Seed of the target vectors (the same for every worker of a job).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep retrying the connection this long while the server is not up yet.
    #[arg(long, default_value_t = 60.0, value_name = "S")]
    connect_timeout: f64,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    auth: AuthArgs,
    #[command(flatten)]
    transport: TransportArgs,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Updates/s of each policy as the share of stragglers grows.
    ///
    /// Runs a server and N workers on loopback for each (straggler share, policy) and reports
    /// updates/s in a table, as JSON and as a PNG graph, with each policy's rate relative to its
    /// own rate at 0% stragglers and to naive's at the same share (ratios from the same run).
    /// Updates/s are rounds closed per second for barrier policies, and pushes applied per second
    /// divided by the workers for vector clocks (one push from each is one naive round's worth).
    Stragglers(StragglerArgs),
    /// Push+pull round trips through Het-Sync against the bare transport, per size.
    ///
    /// For each size, a server on a thread and one worker push and pull one tensor over loopback
    /// (TCP, and RDMA where the host has a device), taking turns with the reference that moves
    /// the same bytes with no framework: a blocking TCP echo, or a verbs RDMA-write ping-pong.
    /// Prints median and 99th-percentile round times, GB/s (tensor bytes / mean round time) and
    /// Het-Sync's ratio to the reference; --json writes the rows.
    Transport(bench_transport::TransportBenchArgs),
    /// Rounds/s and server memory with many workers (a thousand fit on two cores).
    ///
    /// Starts `hetsync server` as a child and drives --workers TCP connections to it from one
    /// thread (epoll), each pushing every part and reading the models back, for --seconds.
    /// Reports rounds/s and the server's VmRSS when listening, with every worker joined and idle,
    /// and at the end; memory per connection is (idle - listening) / workers.
    Scale(bench_scale::ScaleArgs),
    /// GB/s of the gradient-sum kernels against a scalar loop and a fused memory-bound reference.
    ///
    /// For each gradient size and K, sums K gradients into a model in place with every kernel
    /// this CPU supports (scalar, avx2, avx512; the server uses the widest), with the plain
    /// scalar loop, and with the fused reference: the same sum written as a straightforward loop
    /// the compiler vectorises, reading each array once and writing the model once, the speed a
    /// kernel should reach once data comes from memory. The gradients sit in the server's own
    /// arena, laid out as in a job of K workers. Implementations are timed in turn after a
    /// warm-up, for --seconds each; the table shows median GB/s of bytes read and written and
    /// the ratios selected kernel / reference and / scalar loop.
    Aggregate(bench_aggregate::AggregateArgs),
}

/// The options of `hetsync bench stragglers` (its help text is on [`Command`]).
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  hetsync bench stragglers
  hetsync bench stragglers --policies naive,timeout,adaptive --timeout-ms 20
  hetsync bench stragglers --straggler-mode transient --policies naive,bsp,ssp,asp --staleness 3
  hetsync bench stragglers --workers 8 --fractions 0,50 --seconds 5 --json out.json --plot out.png")]
pub(crate) struct StragglerArgs {
    /// Workers per trial.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: u32,
    /// Shares of stragglers in percent, comma separated: of the workers (persistent), or of
    /// every worker's steps (transient).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75", value_parser = clap::value_parser!(u32).range(0..=100))]
    fractions: Vec<u32>,
    /// Policies to compare, comma separated: naive, timeout, adaptive, bsp, ssp, asp.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "naive,timeout,adaptive"
    )]
    policies: Vec<Policy>,
    /// How stragglers behave: persistent (a share of the workers slow at every step) or
    /// transient (every step of every worker slow with that probability).
    #[arg(long, value_enum, default_value_t = Stragglers::Persistent)]
    straggler_mode: Stragglers,
    /// The staleness of ssp (at least 1: staleness 0 is bsp).
    #[arg(long, default_value_t = DEFAULT_STALENESS, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    staleness: u64,
    /// What the barrier policies do with late gradients.
    #[arg(long, value_enum, default_value_t = LateArg::Fold)]
    late: LateArg,
    /// A normal worker's compute time per step.
    #[arg(long, default_value_t = 20.0, value_name = "MS", value_parser = non_negative_ms)]
    compute_ms: f64,
    /// A straggler's compute time per step.
    #[arg(long, default_value_t = 200.0, value_name = "MS", value_parser = non_negative_ms)]
    straggle_ms: f64,
    /// The timeout policy's timeout, and the adaptive policy's start and cap.
    #[arg(long, default_value_t = 20.0, value_name = "MS", value_parser = positive_ms)]
    timeout_ms: f64,
    /// Training time per trial.
    #[arg(long, default_value_t = 3.0, value_name = "SEC")]
    seconds: f64,
    /// Elements (f32) of the model.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 28)))]
    dim: u64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the results as a PNG graph to FILE.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
}

/// The options of `hetsync demo` (its help text is on [`Command`]).
#[derive(Debug, Args)]
struct DemoArgs {
    /// Where to write the JSON results and the graph.
    #[arg(long, default_value = "hetsync-demo", value_name = "DIR")]
    out: PathBuf,
    /// Training time per configuration (three times this with transient stragglers).
    #[arg(long, default_value_t = 3.0, value_name = "SEC")]
    seconds: f64,
}

fn parse_ms(s: &str, allow_zero: bool) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of milliseconds"))?;
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > 86_400_000.0 {
        return Err(format!(
            "{s} ms is out of range (must be {} and at most a day)",
            if allow_zero { ">= 0" } else { "> 0" }
        ));
    }
    Ok(v)
}

fn probability(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a probability"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s} is not a probability between 0 and 1"));
    }
    Ok(v)
}

fn positive_ms(s: &str) -> Result<f64, String> {
    parse_ms(s, false)
}

fn non_negative_ms(s: &str) -> Result<f64, String> {
    parse_ms(s, true)
}

/// Parses the command line and runs the command; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(a) => run::server(a),
        Command::Worker(a) => run::worker(a),
        Command::Status(a) => run::status(a),
        Command::Bench(BenchCommand::Stragglers(a)) => bench::stragglers(&a),
        Command::Bench(BenchCommand::Transport(a)) => bench_transport::run(&a),
        Command::Bench(BenchCommand::Scale(a)) => bench_scale::scale(&a),
        Command::Bench(BenchCommand::Aggregate(a)) => bench_aggregate::aggregate(&a),
        Command::Demo(a) => bench::demo(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut said = e.to_string();
            eprintln!("hetsync: error: {said}");
            let mut cause = e.source();
            while let Some(c) = cause {
                // Most messages already quote their cause; print only what adds something.
                let text = c.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                    said.push_str(&text);
                }
                cause = c.source();
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests;
