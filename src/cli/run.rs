//! `hetsync server` and `hetsync worker`.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::{signals, CliError, LateArg, Policy, ServerArgs, StatusArgs, WorkerArgs};

/// `--timeout-ms` when not given.
const DEFAULT_TIMEOUT_MS: f64 = 10.0;
use crate::server::{Server, ServerConfig};
use crate::worker::{self, WorkerConfig};

/// Raises the open-file soft limit to the hard limit (every worker and every connection still
/// in its handshake holds a descriptor) and says so, or says what is short of `needed`.
fn raise_open_files(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let now = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        eprintln!("hetsync server: open-file limit raised from {soft} to {hard}");
        hard
    } else {
        soft
    };
    if now < needed {
        eprintln!(
            "hetsync server: warning: the open-file limit is {now}, below the {needed} this job may need (its workers, connections still in their handshake, and spares): raise the hard limit (ulimit -Hn, or LimitNOFILE in systemd / the scheduler's settings)"
        );
    }
}

pub(super) fn server(a: ServerArgs) -> Result<(), CliError> {
    signals::install().map_err(|e| format!("installing the SIGINT/SIGTERM handler: {e}"))?;
    let limits = hetsync_transport::channel::Limits::for_workers(a.workers as usize);
    raise_open_files(u64::from(a.workers) + limits.pending as u64 + 64);
    if a.staleness.is_some() && a.policy != Policy::Ssp {
        return Err(
            "--staleness applies to --policy ssp only (bsp is staleness 0, asp has no bound)"
                .into(),
        );
    }
    let staleness = a.staleness.unwrap_or(super::DEFAULT_STALENESS);
    let timed = matches!(a.policy, Policy::Timeout | Policy::Adaptive);
    if !timed {
        // Harmless, but worth saying: scripts often pass one set of options to every policy.
        let name = a.policy.mode(1.0, staleness).name();
        if a.timeout_ms.is_some() {
            eprintln!("hetsync server: note: --timeout-ms has no effect with --policy {name}");
        }
        if a.late.is_some() {
            eprintln!("hetsync server: note: --late has no effect with --policy {name} (no round to be late for)");
        }
    }
    let timeout_ms = a.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    let late = a.late.unwrap_or(LateArg::Fold);
    let mode = a.policy.mode(timeout_ms, staleness);
    let (server, why) = Server::bind(ServerConfig {
        listen: a.listen,
        workers: a.workers as usize,
        dims: a.model.dims()?,
        partition_bytes: a.partition_kib as usize * 1024,
        mode,
        late: late.into(),
        lr: a.lr,
        rounds: a.rounds,
        duration: None,
        progress: (a.progress > 0.0).then(|| Duration::from_secs_f64(a.progress)),
        log_events: !a.quiet,
        round_log: a.round_log.clone(),
        trace: a.trace.clone(),
        save_model: a.save_model.clone(),
        transport: a.transport.transport.into(),
        rdma: a.transport.rdma(),
        handshake_timeout: Duration::from_secs_f64(a.handshake_timeout_ms / 1e3),
        write_timeout: Duration::from_secs_f64(a.write_timeout_ms / 1e3),
        spin: a.transport.spin(),
        secret: a.auth.secret("server")?,
        start_after: a.start_after_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        evict_after: a.evict_after_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        checkpoint: a.checkpoint.clone(),
        checkpoint_every: a.checkpoint_every,
        resume: a.resume.clone(),
        init_model: a.init_model.as_deref().map(read_model).transpose()?,
    })?;
    let mut policy = a.policy.describe(timeout_ms, staleness);
    if timed {
        policy += match late {
            LateArg::Fold => ", late gradients folded",
            LateArg::Drop => ", late gradients dropped",
        };
    }
    // Always printed, even with --quiet: scripts read the port and the transport from these.
    eprintln!("hetsync server: transport {why}");
    let dims = a.model.dims()?;
    let tensors = match dims.len() {
        1 => format!("{} floats", dims[0]),
        n => format!("{n} tensors, {} floats", dims.iter().sum::<usize>()),
    };
    eprintln!(
        "hetsync server: listening on {} | {} workers | {tensors} | parts of at most {} KiB | policy {policy} | lr {} | {}",
        server.local_addr(),
        a.workers,
        a.partition_kib,
        a.lr,
        if a.auth.secret_file.is_some() {
            "workers must know the job's secret"
        } else {
            "no authentication (see --secret-file)"
        }
    );
    let report = server.run(&signals::STOP)?;
    let s = &report.stats;
    if !report.started {
        eprintln!(
            "hetsync server: stopped before training started: {} of {} workers had joined (training starts when all have)",
            s.joins.saturating_sub(s.departures),
            a.workers
        );
        return Ok(());
    }
    let secs = report.elapsed.as_secs_f64();
    if mode.is_clocked() {
        eprintln!(
            "hetsync server: finished: slowest clock {} in {secs:.2} s | gradients applied {} ({:.1}/s) | dropped {} | joins {} departures {} evicted {} refused {}",
            s.rounds,
            s.pushes_applied,
            report.pushes_applied_per_sec(),
            s.dropped,
            s.joins,
            s.departures,
            s.evicted,
            s.refused,
        );
    } else {
        eprintln!(
            "hetsync server: finished: {} rounds in {secs:.2} s ({:.1} rounds/s) | mean participants {:.2}/{} | rounds closed by timeout {} | stragglers left behind {} | gradients on time {} folded {} dropped {} | joins {} departures {} evicted {} refused {}",
            s.rounds,
            report.rounds_per_sec(),
            report.mean_participants(),
            a.workers,
            s.timeouts,
            s.stragglers,
            s.participants,
            s.late_folded,
            s.dropped,
            s.joins,
            s.departures,
            s.evicted,
            s.refused,
        );
    }
    if let Some(path) = &a.save_model {
        eprintln!("hetsync server: model saved to {}", path.display());
    }
    Ok(())
}

pub(super) fn worker(a: WorkerArgs) -> Result<(), CliError> {
    let cfg = WorkerConfig {
        server: a.server.clone(),
        rank: a.rank,
        workers: a.workers.unwrap_or(0),
        dims: a.model.dims()?,
        rounds: a.rounds,
        compute: Duration::from_secs_f64(a.compute_ms / 1e3),
        straggle: a.straggle_ms.map(|ms| Duration::from_secs_f64(ms / 1e3)),
        straggle_prob: a.straggle_prob,
        seed: a.seed,
        connect_wait: Duration::from_secs_f64(a.connect_timeout.max(0.0)),
        transport: a.transport.transport.into(),
        rdma: a.transport.rdma(),
        secret: a.auth.secret("worker")?,
        reconnect: true,
        spin: a.transport.spin(),
    };
    let stop = AtomicBool::new(false);
    let client = worker::connect(&cfg)?;
    if !a.quiet {
        eprintln!(
            "hetsync worker {}: transport {}",
            a.rank,
            client.transport()
        );
    }
    let report = worker::run(&cfg, client, &stop)?;
    if !a.quiet {
        eprintln!(
            "hetsync worker {}: finished: {} pushes, last model from round {}, reconnected {} times ({})",
            a.rank,
            report.pushes,
            report.last_round,
            report.reconnects,
            if report.server_finished {
                "the server ended the run"
            } else {
                "round limit reached"
            }
        );
    }
    Ok(())
}

pub(super) fn status(a: StatusArgs) -> Result<(), CliError> {
    let secret = a.auth.secret("status")?;
    let timeout = Duration::from_secs_f64(a.timeout.max(0.001));
    let report = hetsync_transport::channel::request_status(&a.server, secret.as_ref(), timeout)?;
    let v: serde_json::Value = serde_json::from_slice(&report)
        .map_err(|e| format!("the server's report is not JSON: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = &v["stats"];
    println!(
        "{} | policy {} | {} of {} workers connected | {} | up {:.0} s, training {:.0} s",
        a.server,
        v["policy"].as_str().unwrap_or("?"),
        v["connected"].as_array().map_or(0, Vec::len),
        v["workers"],
        if v["started"].as_bool() == Some(true) {
            format!("round {}", v["rounds"])
        } else {
            "waiting for workers to join".to_string()
        },
        v["uptime_s"].as_f64().unwrap_or(0.0),
        v["training_s"].as_f64().unwrap_or(0.0),
    );
    for m in v["connected"].as_array().into_iter().flatten() {
        println!(
            "  worker {} at {} over {}",
            m["rank"],
            m["addr"].as_str().unwrap_or("?"),
            m["transport"].as_str().unwrap_or("?")
        );
    }
    for t in v["tensors"].as_array().into_iter().flatten() {
        println!(
            "  tensor {}: {} completed, {} updates",
            t["key"], t["completed"], t["updates"]
        );
    }
    println!(
        "  gradients on time {} folded {} dropped {} | joins {} departures {} evicted {} refused {} {} | checkpoints {} (resumed at round {})",
        s["participants"], s["late_folded"], s["dropped"], s["joins"], s["departures"], s["evicted"], s["refused"], s["refused_by_reason"], s["checkpoints"], s["resumed_at"],
    );
    Ok(())
}

/// Reads a model file: raw little-endian f32, as `--save-model` writes it.
fn read_model(path: &std::path::Path) -> Result<Vec<f32>, CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("reading the initial model {}: {e}", path.display()))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "the initial model {} has {} bytes, not a whole number of f32 (4 bytes each)",
            path.display(),
            bytes.len()
        )
        .into());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}
