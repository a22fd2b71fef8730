//! `hetsync server` and `hetsync worker`.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::{signals, CliError, Policy, ServerArgs, WorkerArgs};
use crate::server::{Server, ServerConfig};
use crate::worker::{self, WorkerConfig};

pub(super) fn server(a: ServerArgs) -> Result<(), CliError> {
    signals::install().map_err(|e| format!("installing the SIGINT/SIGTERM handler: {e}"))?;
    let mode = a.policy.mode(a.timeout_ms);
    let (server, why) = Server::bind(ServerConfig {
        listen: a.listen,
        workers: a.workers as usize,
        dims: a.model.dims()?,
        partition_bytes: a.partition_kib as usize * 1024,
        mode,
        lr: a.lr,
        rounds: a.rounds,
        duration: None,
        progress: (a.progress > 0.0).then(|| Duration::from_secs_f64(a.progress)),
        log_events: !a.quiet,
        round_log: a.round_log.clone(),
        save_model: a.save_model.clone(),
        transport: a.transport.transport.into(),
        rdma: a.transport.rdma(),
    })?;
    let policy = match a.policy {
        Policy::Naive => "naive (wait for every worker)".to_string(),
        Policy::Timeout => format!("timeout ({} ms after a round's first push)", a.timeout_ms),
    };
    // Always printed, even with --quiet: scripts read the port and the transport from these.
    eprintln!("hetsync server: transport {why}");
    let dims = a.model.dims()?;
    let tensors = match dims.len() {
        1 => format!("{} floats", dims[0]),
        n => format!("{n} tensors, {} floats", dims.iter().sum::<usize>()),
    };
    eprintln!(
        "hetsync server: listening on {} | {} workers | {tensors} | parts of at most {} KiB | policy {policy} | lr {}",
        server.local_addr(),
        a.workers,
        a.partition_kib,
        a.lr
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
    eprintln!(
        "hetsync server: finished: {} rounds in {:.2} s ({:.1} rounds/s) | mean participants {:.2}/{} | rounds closed by timeout {} | stragglers dropped {} | late gradients {} | joins {} departures {} refused {}",
        s.rounds,
        report.elapsed.as_secs_f64(),
        report.rounds_per_sec(),
        report.mean_participants(),
        a.workers,
        s.timeouts,
        s.stragglers,
        s.late_dropped,
        s.joins,
        s.departures,
        s.refused,
    );
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
        seed: a.seed,
        connect_wait: Duration::from_secs_f64(a.connect_timeout.max(0.0)),
        transport: a.transport.transport.into(),
        rdma: a.transport.rdma(),
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
            "hetsync worker {}: finished: {} pushes, last model from round {} ({})",
            a.rank,
            report.pushes,
            report.last_round,
            if report.server_finished {
                "the server ended the run"
            } else {
                "round limit reached"
            }
        );
    }
    Ok(())
}
