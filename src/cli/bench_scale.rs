//! `hetsync bench scale`: many worker connections to one server (a child process), its rounds/s
//! and what each connection costs it in memory.
//!
//! The server runs as a child (`hetsync server` from this same binary) so its resident memory
//! can be read from `/proc/<pid>/status` apart from the workers'. It is read three times: once the
//! server listens (the arena, which holds every worker's slots, already mapped), once every
//! connection has joined and holds its first models (before any push), and at the end of the
//! run. The difference between the first two, over the workers, is what one idle connection
//! costs the server. The workers are a [`Swarm`]: every connection in this process, driven by
//! one thread.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IsTerminal};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use std::path::PathBuf;

use super::{CliError, Policy};
use crate::swarm::Swarm;

/// The options of `hetsync bench scale` (its help text is on `BenchCommand::Scale`).
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  hetsync bench scale --workers 1000 --dims 16 --seconds 5
  hetsync bench scale --workers 100 --dims 1048576,1024 --partition-kib 256 --json scale.json
  hetsync bench scale --workers 4000 --policy timeout    # needs `ulimit -n` above 4064")]
pub(crate) struct ScaleArgs {
    /// Worker connections (ranks 0..N-1), all from this process.
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(super) workers: u32,
    /// Elements (f32) of each tensor, comma separated.
    #[arg(long, value_name = "D1,D2,...", value_delimiter = ',', default_value = "16", value_parser = clap::value_parser!(u64).range(1..=(1u64 << 28)))]
    pub(super) dims: Vec<u64>,
    /// Pushing time, after every worker joined (at most an hour).
    #[arg(long, default_value_t = 5.0, value_name = "S")]
    seconds: f64,
    /// The server's --partition-kib: largest part a tensor travels in.
    #[arg(long, value_name = "P", default_value_t = (crate::server::DEFAULT_PARTITION_BYTES / 1024) as u32, value_parser = clap::value_parser!(u32).range(1..=(1 << 20)))]
    partition_kib: u32,
    /// The server's --policy, with its default --timeout-ms and --staleness.
    #[arg(long, value_enum, default_value_t = Policy::Naive)]
    pub(super) policy: Policy,
    /// How workers connect: TCP only (one epoll set drives every connection).
    #[arg(long, value_enum, default_value_t = ScaleTransport::Tcp)]
    transport: ScaleTransport,
    /// Every worker must have joined within this (retrying while the server starts).
    #[arg(long, default_value_t = 120.0, value_name = "S")]
    connect_timeout: f64,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// How long the server may take to say where it listens (it maps the arena first).
const SERVER_START: Duration = Duration::from_secs(60);
/// How long after the last connection the server may take to send everyone's first models.
const FIRST_MODELS: Duration = Duration::from_secs(60);
/// No model coming back for this long during the run is a failure, not a slow round.
const STALL: Duration = Duration::from_secs(15);
/// How long the server may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A pause before each memory reading, so the server has finished what the last event started
/// (it is idle at the first two readings).
const SETTLE: Duration = Duration::from_millis(300);
/// Lines of the server's log kept for error messages.
const TAIL: usize = 30;
/// Open files the bench needs besides its connections: stdio, the epoll set, the server's pipe,
/// and room to spare.
const SPARE_FILES: u64 = 64;
/// How much longer than its phases' own bounds the run may take before the server is killed:
/// room for the readings' pauses, a stall's detection and a loaded machine.
const HARD_CAP_MARGIN: f64 = 60.0;
/// The longest run `--seconds` accepts: a bound on the whole bench, whatever is asked.
pub(super) const MAX_SECONDS: f64 = 3600.0;
/// The target a connection's memory is held to (beyond the arena's slots, mapped at start).
const TARGET_KIB_PER_CONNECTION: f64 = 64.0;

/// How the bench's workers connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScaleTransport {
    /// TCP: every connection a non-blocking socket in one epoll set. (An RDMA worker needs its
    /// own queue pair and registered buffers: not a thousand in one process.)
    Tcp,
}

/// What the bench reports (the `--json` file).
#[derive(Debug, Serialize)]
struct Results {
    pub(super) workers: u32,
    pub(super) dims: Vec<u64>,
    seconds: f64,
    /// Rounds (clocks, for vector clocks) every connection completed: pushed every part and
    /// got its models back.
    rounds: u64,
    rounds_per_s: f64,
    server_rss_baseline_kib: u64,
    server_rss_idle_kib: u64,
    server_rss_end_kib: u64,
    /// (idle - baseline) / workers.
    rss_per_connection_kib: f64,
    connect_s: f64,
    policy: String,
    partition_kib: u32,
    parts: usize,
    /// The rounds the server itself counted, from its final line (when it printed one).
    server_rounds: Option<u64>,
}

/// The server under test: a child process, killed (by its PID) and reaped when dropped, so no
/// run, failed or not, leaves it behind.
struct ServerChild {
    child: Child,
    /// The last lines of its log.
    log: Arc<Mutex<VecDeque<String>>>,
    addr: String,
    /// Kills the server if the run outlives its hard cap (see [`arm`](Self::arm)).
    watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl ServerChild {
    /// Starts `hetsync server` with `args` and waits until it says where it listens.
    fn spawn(args: &[String]) -> Result<Self, CliError> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("finding this program to run the server with: {e}"))?;
        let mut child = Command::new(&exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the server ({}): {e}", exe.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        // Reads the log to its end: a full pipe would block the server in the middle of a round.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let addr = addr.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_string());
                }
                let mut l = sink.lock().expect("log lock");
                if l.len() == TAIL {
                    l.pop_front();
                }
                l.push_back(line);
            }
        });
        let mut server = Self {
            child,
            log,
            addr: String::new(),
            watchdog: None,
        };
        match rx.recv_timeout(SERVER_START) {
            Ok(addr) => server.addr = addr,
            Err(RecvTimeoutError::Timeout) => {
                let e = format!(
                    "the server did not say where it listens within {} s",
                    SERVER_START.as_secs()
                );
                return Err(server.explain(e));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(server.explain("the server ended before it listened".into()));
            }
        }
        Ok(server)
    }

    /// The server's resident memory (VmRSS) in KiB.
    fn rss_kib(&mut self) -> Result<u64, CliError> {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path);
        let rss = status.as_ref().ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        });
        match (rss, status) {
            (Some(kib), _) => Ok(kib),
            (None, Err(e)) => {
                Err(self.explain(format!("reading the server's memory from {path}: {e}")))
            }
            (None, Ok(_)) => Err(self.explain(format!("no VmRSS line in {path}"))),
        }
    }

    /// Kills the server (SIGKILL, to its PID) if it is still running `cap` from now: a worker
    /// blocked in its handshake with a server that stopped answering (SIGSTOP, a livelock) then
    /// sees the connection end, so every wait of the bench ends, whatever happens.
    fn arm(&mut self, cap: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let (tx, rx) = mpsc::channel::<()>();
        let handle = std::thread::spawn(move || {
            if rx.recv_timeout(cap) == Err(RecvTimeoutError::Timeout) {
                eprintln!(
                    "bench scale: the run outlived its hard cap of {} s: killing the server",
                    cap.as_secs()
                );
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        self.watchdog = Some((tx, handle));
    }

    /// Stops the watchdog. Done before the child can be reaped: once reaped, its PID may name
    /// another process, which the watchdog must never signal.
    fn disarm(&mut self) {
        if let Some((tx, handle)) = self.watchdog.take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    /// Whether (and how) the server has exited (reaping it if it has).
    fn exited(&mut self) -> Option<ExitStatus> {
        self.disarm();
        self.child.try_wait().ok().flatten()
    }

    /// `e`, with whether the server exited and the end of its log: most failures are told there.
    fn explain(&mut self, e: String) -> CliError {
        // An exited server's last lines may still be in the pipe.
        std::thread::sleep(Duration::from_millis(100));
        let mut text = e;
        if let Some(status) = self.exited() {
            text += &format!(" (the server exited: {status})");
        }
        let log = self.log.lock().expect("log lock");
        if !log.is_empty() {
            text += "\n  the server's last lines:";
            for l in log.iter() {
                text += "\n    ";
                text += l;
            }
        }
        text.into()
    }

    /// Stops the server as Slurm would (SIGTERM, to its PID), closes the workers' connections,
    /// and waits for it to exit (killing it after [`STOP_GRACE`]). Returns the rounds its final
    /// line reports, if it printed one.
    fn stop(mut self, swarm: Swarm) -> Option<u64> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        // Closed connections let the server's goodbye finish at once instead of lingering.
        drop(swarm);
        let deadline = Instant::now() + STOP_GRACE;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            eprintln!(
                "bench scale: warning: the server did not stop within {} s of SIGTERM: killed",
                STOP_GRACE.as_secs()
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log.lock().expect("log lock");
        log.iter().find_map(|l| finished_rounds(l))
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        // Only this child, by its PID; wait() reaps it either way.
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The rounds in the server's final line: "finished: R rounds in ..." (barrier) or "finished:
/// slowest clock R in ..." (vector clocks).
fn finished_rounds(line: &str) -> Option<u64> {
    let rest = line.split("finished: ").nth(1)?;
    rest.split_whitespace().find_map(|w| w.parse().ok())
}

/// Raises this process's open-file soft limit to the hard limit (every connection is a
/// descriptor here, and another in the server, which inherits the limit and raises its own), or
/// says how to when the hard limit is too low for `n` connections.
fn raise_open_files(n: usize) -> Result<(), CliError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let needed = n as u64 + SPARE_FILES;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("reading the open-file limit: {e}"))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .map_err(|e| format!("raising the open-file limit from {soft} to {hard}: {e}"))?;
    }
    if hard < needed {
        return Err(format!(
            "{n} connections need about {needed} open files in this process (and as many in the server), but the hard limit is {hard}: run `ulimit -n {needed}` in the shell first (raising the hard limit needs root, /etc/security/limits.conf, or LimitNOFILE= in systemd)"
        )
        .into());
    }
    Ok(())
}

/// Runs `hetsync bench scale`.
pub(super) fn scale(a: &ScaleArgs) -> Result<(), CliError> {
    if !(a.seconds > 0.0 && a.seconds <= MAX_SECONDS) {
        return Err(format!("--seconds must be above 0 and at most {MAX_SECONDS}").into());
    }
    if !(a.connect_timeout > 0.0 && a.connect_timeout <= MAX_SECONDS) {
        return Err(format!("--connect-timeout must be above 0 and at most {MAX_SECONDS}").into());
    }
    let n = a.workers as usize;
    let dims: Vec<usize> = a.dims.iter().map(|&d| d as usize).collect();
    raise_open_files(n)?;
    let policy = a
        .policy
        .to_possible_value()
        .expect("no policy is hidden")
        .get_name()
        .to_string();
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let args: Vec<String> = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        &n.to_string(),
        "--dims",
        &list(&a.dims),
        "--partition-kib",
        &a.partition_kib.to_string(),
        "--policy",
        &policy,
        "--transport",
        match a.transport {
            ScaleTransport::Tcp => "tcp",
        },
        "--progress",
        "0",
        // A line per join would be a thousand lines; errors are still printed.
        "--quiet",
    ]
    .map(String::from)
    .to_vec();
    eprintln!(
        "bench scale: {n} workers, tensors of {} floats, policy {policy}, {} s: starting the server",
        list(&a.dims),
        a.seconds
    );
    let mut server = ServerChild::spawn(&args)?;
    let cap = a.connect_timeout + FIRST_MODELS.as_secs_f64() + a.seconds + HARD_CAP_MARGIN;
    server.arm(Duration::from_secs_f64(cap));
    std::thread::sleep(SETTLE);
    let baseline = server.rss_kib()?;
    eprintln!(
        "bench scale: server {} (pid {}) listening, RSS {baseline} KiB; connecting {n} workers",
        server.addr,
        server.child.id()
    );

    let t0 = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let step = (n / 10).max(1);
    let connected = Swarm::connect(
        &server.addr,
        n,
        &dims,
        Duration::from_secs_f64(a.connect_timeout),
        |i| {
            if tty {
                eprint!("\rbench scale: connecting {i}/{n}");
                if i == n {
                    eprintln!();
                }
            } else if i % step == 0 || i == n {
                eprintln!(
                    "bench scale: connecting {i}/{n} ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                );
            }
        },
    );
    let mut swarm = connected.map_err(|e| server.explain(e.to_string()))?;
    let connect_s = t0.elapsed().as_secs_f64();
    swarm
        .wait_first_models(Instant::now() + FIRST_MODELS)
        .map_err(|e| server.explain(e.to_string()))?;
    std::thread::sleep(SETTLE);
    let idle = server.rss_kib()?;
    let per_conn = (idle as f64 - baseline as f64) / n as f64;
    eprintln!(
        "bench scale: {n} connected in {connect_s:.2} s, all hold their first models; server RSS {idle} KiB ({per_conn:.1} KiB per connection); pushing for {} s",
        a.seconds
    );

    let start = Instant::now();
    let mut last = (start, 0);
    swarm
        .run(
            start + Duration::from_secs_f64(a.seconds),
            Duration::from_secs(1),
            STALL,
            |s| {
                let (now, r) = (Instant::now(), s.rounds());
                let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
                eprintln!(
                    "bench scale: {:5.1} s: round {}, {:.1} rounds/s",
                    now.duration_since(start).as_secs_f64(),
                    r,
                    (r - last.1) as f64 / dt
                );
                last = (now, r);
            },
        )
        .map_err(|e| server.explain(e.to_string()))?;
    let elapsed = start.elapsed().as_secs_f64();
    let rounds = swarm.rounds();
    let end = server.rss_kib()?;
    let parts = swarm.parts().len();
    let server_rounds = server.stop(swarm);

    let results = Results {
        workers: a.workers,
        dims: a.dims.clone(),
        seconds: a.seconds,
        rounds,
        rounds_per_s: rounds as f64 / elapsed.max(1e-9),
        server_rss_baseline_kib: baseline,
        server_rss_idle_kib: idle,
        server_rss_end_kib: end,
        rss_per_connection_kib: per_conn,
        connect_s,
        policy,
        partition_kib: a.partition_kib,
        parts,
        server_rounds,
    };
    print_summary(&results);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&results)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("writing the results to {}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

fn print_summary(r: &Results) {
    println!();
    println!("| workers | connect (s) | rounds | rounds/s | server RSS baseline / idle / end (KiB) | RSS per idle connection (KiB) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {} | {:.2} | {} | {:.1} | {} / {} / {} | {:.1} |",
        r.workers,
        r.connect_s,
        r.rounds,
        r.rounds_per_s,
        r.server_rss_baseline_kib,
        r.server_rss_idle_kib,
        r.server_rss_end_kib,
        r.rss_per_connection_kib
    );
    println!();
    println!(
        "rounds completed by all {} workers: {}{}",
        r.workers,
        r.rounds,
        match r.server_rounds {
            Some(s) => format!(" (the server counted {s}, including those in flight at the end)"),
            None => String::new(),
        }
    );
    let met = r.rss_per_connection_kib <= TARGET_KIB_PER_CONNECTION;
    println!(
        "server memory per idle connection: {:.1} KiB, target <= {TARGET_KIB_PER_CONNECTION} KiB: {}",
        r.rss_per_connection_kib,
        if met { "met" } else { "NOT met" }
    );
}

#[cfg(test)]
mod tests {
    use super::finished_rounds;

    #[test]
    fn the_server_final_line_gives_its_rounds() {
        assert_eq!(
            finished_rounds(
                "hetsync server: finished: 123 rounds in 2.00 s (61.5 rounds/s) | mean"
            ),
            Some(123)
        );
        assert_eq!(
            finished_rounds("hetsync server: finished: slowest clock 77 in 2.00 s | gradients"),
            Some(77)
        );
        assert_eq!(
            finished_rounds("hetsync server: listening on 1.2.3.4:5"),
            None
        );
    }
}
