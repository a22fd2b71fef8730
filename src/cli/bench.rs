//! `hetsync bench stragglers` and `hetsync demo`: the straggler experiment, its table, JSON and
//! graph.

use std::fs;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Args, FromArgMatches};
use serde::Serialize;

use super::{plot, CliError, DemoArgs, StragglerArgs};
use crate::experiment::{policy_name, run_trial, Row, Trial};

#[derive(Serialize)]
struct Config {
    workers: u32,
    compute_ms: f64,
    straggle_ms: f64,
    timeout_ms: f64,
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
    let mut args = StragglerArgs::from_arg_matches(&matches)?;
    args.seconds = a.seconds;
    fs::create_dir_all(&a.out)
        .map_err(|e| format!("creating the output directory {}: {e}", a.out.display()))?;
    args.json = Some(a.out.join("stragglers.json"));
    args.plot = Some(a.out.join("stragglers.png"));
    eprintln!(
        "Het-Sync straggler demo: {} workers on loopback, stragglers {}x slower ({} ms vs {} ms per step), naive barrier vs {} ms timeout barrier, {} s per configuration.",
        args.workers,
        args.straggle_ms / args.compute_ms.max(1e-9),
        args.straggle_ms,
        args.compute_ms,
        args.timeout_ms,
        args.seconds
    );
    stragglers(&args)
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
                mode: p.mode(a.timeout_ms),
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
        let label = format!(
            "[{}/{total}] {:<7} {:>3}% stragglers ({} of {})",
            i + 1,
            policy_name(trial.mode),
            trial.stragglers_pct,
            trial.stragglers(),
            trial.workers
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
        eprintln!(
            "{label}: {:.1} updates/s ({} rounds, {:.2} gradients per round)",
            row.updates_per_sec, row.rounds, row.mean_participants
        );
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
                timeout_ms: a.timeout_ms,
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
    unique(a.policies.iter().map(|p| policy_name(p.mode(a.timeout_ms))))
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
}
