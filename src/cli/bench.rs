//! `hetsync bench stragglers` and `hetsync demo`: the straggler experiments, their tables,
//! ratios, JSON and graphs.

use std::fs;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Args, FromArgMatches};
use serde::Serialize;

use super::{plot, CliError, DemoArgs, Policy, StragglerArgs};
use crate::experiment::{run_trial, Row, Stragglers, Trial};

#[derive(Serialize)]
struct Config {
    workers: u32,
    compute_ms: f64,
    straggle_ms: f64,
    straggler_mode: Stragglers,
    timeout_ms: f64,
    staleness: u64,
    late: &'static str,
    seconds: f64,
    dim: u64,
}

#[derive(Serialize)]
struct Results<'a> {
    config: Config,
    rows: &'a [Row],
}

pub(super) fn demo(a: &DemoArgs) -> Result<(), CliError> {
    // The demo is `bench stragglers` with its defaults: parse an empty command line for them.
    let matches =
        StragglerArgs::augment_args(clap::Command::new("demo")).try_get_matches_from(["demo"])?;
    let defaults = StragglerArgs::from_arg_matches(&matches)?;
    fs::create_dir_all(&a.out)
        .map_err(|e| format!("creating the output directory {}: {e}", a.out.display()))?;
    let tables = [
        (
            "Het-Sync",
            Stragglers::Persistent,
            vec![Policy::Naive, Policy::Timeout, Policy::Adaptive],
        ),
        (
            "Angel",
            Stragglers::Transient,
            vec![Policy::Naive, Policy::Bsp, Policy::Ssp, Policy::Asp],
        ),
    ];
    for (seed, mode, policies) in tables {
        let name = match mode {
            Stragglers::Persistent => "persistent",
            Stragglers::Transient => "transient",
        };
        // Transient stragglers are random: their rates need longer runs to settle (a simulation
        // of this schedule puts SSP's 3 s ratio anywhere from 1.4 to 2.1 x, its 9 s one within
        // 1.5-1.8 x).
        let (seconds, fractions) = match mode {
            Stragglers::Persistent => (a.seconds, defaults.fractions.clone()),
            Stragglers::Transient => (3.0 * a.seconds, vec![0, 25, 50]),
        };
        let args = StragglerArgs {
            seconds,
            fractions,
            straggler_mode: mode,
            policies,
            json: Some(a.out.join(format!("{name}.json"))),
            plot: Some(a.out.join(format!("{name}.png"))),
            ..defaults.clone()
        };
        eprintln!();
        match mode {
            Stragglers::Persistent => eprintln!(
                "== {seed}: {} workers on loopback, a share of them always {}x slower ({} ms vs {} ms per step); naive barrier vs the timeout barrier and the adaptive timeout, both starting at {} ms; {} s per configuration.",
                args.workers,
                args.straggle_ms / args.compute_ms.max(1e-9),
                args.straggle_ms,
                args.compute_ms,
                args.timeout_ms,
                args.seconds
            ),
            Stragglers::Transient => eprintln!(
                "== {seed}: {} workers on loopback, every step {}x slower with that probability ({} ms vs {} ms); naive vs vector clocks BSP, SSP (staleness {}) and ASP; {} s per configuration.",
                args.workers,
                args.straggle_ms / args.compute_ms.max(1e-9),
                args.straggle_ms,
                args.compute_ms,
                args.staleness,
                args.seconds
            ),
        }
        println!("\n## {seed}: {name} stragglers");
        stragglers(&args)?;
    }
    Ok(())
}

pub(super) fn stragglers(a: &StragglerArgs) -> Result<(), CliError> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err("--seconds must be a positive number".into());
    }
    if a.fractions.is_empty() || a.policies.is_empty() {
        return Err("give at least one fraction and one policy".into());
    }
    let policies = unique(a.policies.iter().copied());
    let trials: Vec<Trial> = unique(a.fractions.iter().copied())
        .into_iter()
        .flat_map(|pct| {
            policies.iter().map(move |p| Trial {
                workers: a.workers,
                stragglers_pct: pct,
                stragglers_mode: a.straggler_mode,
                mode: p.mode(a.timeout_ms, a.staleness),
                late: a.late.into(),
                compute: Duration::from_secs_f64(a.compute_ms / 1e3),
                straggle: Duration::from_secs_f64(a.straggle_ms / 1e3),
                duration: Duration::from_secs_f64(a.seconds),
                dim: a.dim as usize,
                lr: 0.1,
            })
        })
        .collect();
    let tty = std::io::stderr().is_terminal();
    let total = trials.len();
    let mut rows = Vec::with_capacity(total);
    for (i, trial) in trials.iter().enumerate() {
        let who = match trial.stragglers_mode {
            Stragglers::Persistent => {
                format!("{} of {} workers", trial.stragglers(), trial.workers)
            }
            Stragglers::Transient => "of every worker's steps".to_string(),
        };
        let label = format!(
            "[{}/{total}] {:<8} {:>3}% stragglers ({who})",
            i + 1,
            trial.mode.name(),
            trial.stragglers_pct,
        );
        let mut tick = |elapsed: Duration| {
            if tty {
                let frac = (elapsed.as_secs_f64() / a.seconds).min(1.0);
                let done = (frac * 30.0) as usize;
                eprint!(
                    "\r{label} [{}{}] {:4.1}/{:.1} s",
                    "#".repeat(done),
                    ".".repeat(30 - done),
                    elapsed.as_secs_f64().min(a.seconds),
                    a.seconds
                );
                let _ = std::io::stderr().flush();
            }
        };
        let row = run_trial(trial, &mut tick).map_err(|e| format!("{label}: {e}"))?;
        if tty {
            eprint!("\r\x1b[2K");
        }
        if trial.mode.is_clocked() {
            eprintln!(
                "{label}: {:.1} updates/s ({:.1} pushes applied/s, slowest clock {})",
                row.updates_per_sec, row.pushes_applied_per_sec, row.rounds
            );
        } else {
            eprintln!(
                "{label}: {:.1} updates/s ({} rounds, {:.2} gradients on time per round, {} folded, {} dropped)",
                row.updates_per_sec, row.rounds, row.mean_participants, row.folded, row.dropped
            );
        }
        rows.push(row);
    }
    print_table(a, &rows);
    print_ratios(a, &rows);
    if let Some(path) = &a.json {
        let results = Results {
            config: Config {
                workers: a.workers,
                compute_ms: a.compute_ms,
                straggle_ms: a.straggle_ms,
                straggler_mode: a.straggler_mode,
                timeout_ms: a.timeout_ms,
                staleness: a.staleness,
                late: match a.late {
                    super::LateArg::Fold => "fold",
                    super::LateArg::Drop => "drop",
                },
                seconds: a.seconds,
                dim: a.dim,
            },
            rows: &rows,
        };
        let text = serde_json::to_string_pretty(&results)?;
        fs::write(path, text + "\n")
            .map_err(|e| format!("writing the results to {}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if let Some(path) = &a.plot {
        plot::stragglers(path, &rows, a)?;
        eprintln!("graph written to {}", path.display());
    }
    Ok(())
}

fn rate(rows: &[Row], policy: &str, pct: u32) -> Option<f64> {
    rows.iter()
        .find(|r| r.policy == policy && r.stragglers_pct == pct)
        .map(|r| r.updates_per_sec)
}

/// `items` without repeats, in first-seen order.
fn unique<T: PartialEq + Copy>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut v = Vec::new();
    for x in items {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

fn policies(a: &StragglerArgs) -> Vec<&'static str> {
    unique(
        a.policies
            .iter()
            .map(|p| p.mode(a.timeout_ms, a.staleness).name()),
    )
}

fn print_table(a: &StragglerArgs, rows: &[Row]) {
    let pols = policies(a);
    println!();
    print!("| % of stragglers |");
    for p in &pols {
        print!(" {p} (updates/s) |");
    }
    println!();
    print!("| ---: |");
    for _ in &pols {
        print!(" ---: |");
    }
    println!();
    for pct in unique(a.fractions.iter().copied()) {
        print!("| {pct}% |");
        for p in &pols {
            match rate(rows, p, pct) {
                Some(r) => print!(" {r:.1} |"),
                None => print!(" - |"),
            }
        }
        println!();
    }
}

/// The figures the experiment is judged by, as ratios measured in this same run.
fn print_ratios(a: &StragglerArgs, rows: &[Row]) {
    println!();
    if a.compute_ms > 0.0 {
        let ideal = 1e3 / a.compute_ms;
        for p in policies(a) {
            if let Some(r0) = rate(rows, p, 0) {
                println!(
                    "{p}: at 0% stragglers {r0:.1} updates/s = {:.3} x 1/compute ({ideal:.1}/s)",
                    r0 / ideal
                );
            }
        }
    }
    for p in policies(a) {
        let Some(r0) = rate(rows, p, 0).filter(|&r| r > 0.0) else {
            continue;
        };
        let ratios: Vec<String> = a
            .fractions
            .iter()
            .filter(|&&pct| pct != 0)
            .filter_map(|&pct| rate(rows, p, pct).map(|r| format!("{pct}%: {:.3}", r / r0)))
            .collect();
        if !ratios.is_empty() {
            println!(
                "{p}: updates/s relative to its own 0% rate: {}",
                ratios.join(", ")
            );
        }
    }
    for p in policies(a).into_iter().filter(|&p| p != "naive") {
        let ratios: Vec<String> = unique(a.fractions.iter().copied())
            .into_iter()
            .filter_map(|pct| {
                let naive = rate(rows, "naive", pct).filter(|&r| r > 0.0)?;
                rate(rows, p, pct).map(|r| format!("{pct}%: {:.2} x", r / naive))
            })
            .collect();
        if !ratios.is_empty() {
            println!(
                "{p}: updates/s relative to naive at the same share: {}",
                ratios.join(", ")
            );
        }
    }
}
