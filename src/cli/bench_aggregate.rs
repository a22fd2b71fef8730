//! `hetsync bench aggregate`: GB/s of every gradient-sum kernel this CPU supports against the
//! plain scalar loop and the fused reference ([`crate::engine::reference`]), measured in the same
//! run, interleaved, over gradients in the server's own arena.

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use hetsync_transport::protocol::{Parts, MAX_PART_BYTES, MIN_PART_BYTES};
use hetsync_transport::{Arena, Update};
use serde::Serialize;

use std::path::PathBuf;

use clap::Args;

use super::CliError;
use crate::engine::{reference, Kernel};
use crate::Rank;

/// The options of `hetsync bench aggregate` (its help text is on `BenchCommand::Aggregate`).
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  hetsync bench aggregate
  hetsync bench aggregate --sizes 1M,64M --k 4 --seconds 2
  hetsync bench aggregate --k 1,2,4,8,16 --json aggregate.jsonl   # one JSON object per line")]
pub(crate) struct AggregateArgs {
    /// Bytes per gradient, comma separated: a number of bytes (a multiple of 4) or with K, M or
    /// G (KiB, MiB, GiB). Pick sizes in cache and past the last-level cache.
    #[arg(long, value_name = "SIZE,...", value_delimiter = ',', default_value = "64K,1M,16M,64M", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Numbers of gradients summed at once (the workers of a round), comma separated.
    #[arg(long, value_name = "K,...", value_delimiter = ',', default_value = "1,2,4,8", value_parser = clap::value_parser!(u32).range(1..=256))]
    k: Vec<u32>,
    /// Measuring time of each (size, K, implementation), after a warm-up of a tenth of it;
    /// each gets 5 to 2000 samples (short sums are timed in batches of at least 200 us).
    #[arg(long, default_value_t = 0.3, value_name = "S")]
    seconds: f64,
    /// Write the results to FILE as JSON lines: one describing the machine (CPU, CPUs, kernels),
    /// then one per size, K and implementation (p50 and p99 time of one sum, GB/s).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// The factor the sums are scaled by (small, so repeated in-place sums stay tame).
const ALPHA: f32 = -1e-3;
/// Shortest sample: calls are batched up to this long so the clock's resolution does not show.
const SAMPLE: Duration = Duration::from_micros(200);
/// Samples of each implementation at least (even past `--seconds`) and at most.
const MIN_SAMPLES: usize = 5;
const MAX_SAMPLES: usize = 2000;

/// One way of summing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Impl {
    /// [`reference::scalar_loop`].
    ScalarLoop,
    /// [`reference::fused_reference`].
    Reference,
    Kernel(Kernel),
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::ScalarLoop => "scalar_loop",
            Impl::Reference => "reference",
            Impl::Kernel(k) => k.name(),
        }
    }

    fn run(self, dst: &mut [f32], grads: &[&[f32]]) {
        match self {
            Impl::ScalarLoop => reference::scalar_loop(dst, grads, ALPHA),
            Impl::Reference => reference::fused_reference(dst, grads, ALPHA),
            Impl::Kernel(k) => k.sum_scaled_into(dst, grads, ALPHA),
        }
    }
}

/// One (size, K, implementation) measurement, as a JSON line.
#[derive(Debug, Serialize)]
struct Row {
    kind: &'static str,
    #[serde(rename = "impl")]
    imp: &'static str,
    /// Whether this is the kernel the server uses here ([`Kernel::best`]).
    selected: bool,
    k: usize,
    /// Bytes per gradient.
    size: usize,
    p50_us: f64,
    p99_us: f64,
    /// Bytes read and written per sum (K gradients and the model read, the model written) over
    /// the median time.
    gbps: f64,
    samples: usize,
}

/// The JSON line that describes the machine.
#[derive(Debug, Serialize)]
struct Machine {
    kind: &'static str,
    cpu: String,
    nproc: usize,
    kernels: Vec<&'static str>,
    selected: &'static str,
    seconds: f64,
}

pub(super) fn aggregate(a: &AggregateArgs) -> Result<(), CliError> {
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        return Err("--seconds must be a positive number".into());
    }
    let sizes = unique(a.sizes.iter().map(|&s| s as usize));
    let ks = unique(a.k.iter().map(|&k| k as usize));
    if sizes.is_empty() || ks.is_empty() {
        return Err("give at least one size and one K".into());
    }
    let selected = Kernel::best();
    let mut impls = vec![Impl::ScalarLoop, Impl::Reference];
    impls.extend(Kernel::available().into_iter().map(Impl::Kernel));
    let machine = Machine {
        kind: "machine",
        cpu: cpu_model(),
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernels: Kernel::available().into_iter().map(Kernel::name).collect(),
        selected: selected.name(),
        seconds: a.seconds,
    };
    eprintln!(
        "{} ({} CPUs), kernels {}, selected {}; {} sizes x {} K x {} implementations, about {:.0} s",
        machine.cpu,
        machine.nproc,
        machine.kernels.join(", "),
        selected.name(),
        sizes.len(),
        ks.len(),
        impls.len(),
        (sizes.len() * ks.len() * impls.len()) as f64 * a.seconds * 1.2
    );
    let budget = Duration::from_secs_f64(a.seconds);
    let k_max = *ks.iter().max().expect("not empty");
    let total = sizes.len() * ks.len();
    let mut rows = Vec::new();
    for &size in &sizes {
        let n = size / 4;
        let mut arena = arena(k_max, n)
            .map_err(|e| format!("{k_max} gradients of {}: {e}", show_size(size)))?;
        for &k in &ks {
            let cell = format!(
                "[{}/{total}] {} x K={k}",
                rows.len() / impls.len() + 1,
                show_size(size)
            );
            eprint!("{cell}: ");
            let _ = std::io::stderr().flush();
            let samples = with_slots(&mut arena, k, |dst, grads| {
                measure(&impls, dst, grads, budget)
            })?;
            let bytes = ((k + 2) * size) as f64;
            let mut said = Vec::new();
            for (imp, mut s) in impls.iter().zip(samples) {
                s.sort_by(f64::total_cmp);
                let (p50, p99) = (percentile(&s, 0.5), percentile(&s, 0.99));
                let row = Row {
                    kind: "aggregate",
                    imp: imp.name(),
                    selected: *imp == Impl::Kernel(selected),
                    k,
                    size,
                    p50_us: p50 * 1e6,
                    p99_us: p99 * 1e6,
                    gbps: bytes / p50 / 1e9,
                    samples: s.len(),
                };
                said.push(format!("{} {:.1}", row.imp, row.gbps));
                rows.push(row);
            }
            eprintln!("{} GB/s", said.join(", "));
        }
    }
    print_table(&impls, selected, &sizes, &ks, &rows);
    if let Some(path) = &a.json {
        let mut text = serde_json::to_string(&machine)? + "\n";
        for r in &rows {
            text += &(serde_json::to_string(r)? + "\n");
        }
        fs::write(path, text)
            .map_err(|e| format!("writing the results to {}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// `k` gradient slots of `n` floats in the server's own arena (a job of one `n`-float part and
/// `k` workers), filled with deterministic data and held, as when a round closes: the slots are
/// where the server would sum them, staggered off 4 KiB multiples by the arena's own rule.
fn arena(k: usize, n: usize) -> Result<Arena, CliError> {
    let part_bytes = (4 * n).next_multiple_of(MIN_PART_BYTES);
    if part_bytes > MAX_PART_BYTES {
        return Err(format!("a gradient may be at most {}", show_size(MAX_PART_BYTES)).into());
    }
    let mut arena = Arena::new(k, Parts::new(&[n], part_bytes)?)?;
    for rank in 0..k as Rank {
        let slot: &mut [f32] = bytemuck::cast_slice_mut(
            arena
                .receive_into(rank, 0)
                .expect("a new arena lends every slot"),
        );
        let mut x = (u64::from(rank) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for v in slot {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        arena.hand_over(rank, 0, 0)?;
    }
    Ok(arena)
}

/// Calls `f` with the model and the first `k` workers' gradients, as the server's update does.
fn with_slots<R>(
    arena: &mut Arena,
    k: usize,
    f: impl FnOnce(&mut [f32], &[&[f32]]) -> R,
) -> Result<R, CliError> {
    let ranks: Vec<Rank> = (0..k as Rank).collect();
    let mut out = None;
    arena.update(0, &ranks, |target, grads| {
        let dst = match target {
            Update::InPlace(dst) => dst,
            Update::Into { next, .. } => next,
        };
        out = Some(f(dst, grads));
    })?;
    Ok(out.expect("update calls its closure"))
}

/// Seconds per call of each implementation: a warm-up, then samples round-robin (so drift on a
/// shared machine hits every implementation alike) until each has had `budget` and at least
/// `MIN_SAMPLES` samples.
fn measure(impls: &[Impl], dst: &mut [f32], grads: &[&[f32]], budget: Duration) -> Vec<Vec<f64>> {
    let batch: Vec<u32> = impls
        .iter()
        .map(|imp| {
            // Warm-up (caches, frequency) that also sizes the batch.
            let (mut calls, t) = (0u32, Instant::now());
            while calls < 2 || t.elapsed() < budget / 10 {
                imp.run(dst, grads);
                calls += 1;
            }
            let per = t.elapsed().as_secs_f64() / f64::from(calls);
            (SAMPLE.as_secs_f64() / per).ceil().clamp(1.0, 1e6) as u32
        })
        .collect();
    let mut samples = vec![Vec::new(); impls.len()];
    let t = Instant::now();
    let enough = budget * impls.len() as u32;
    while samples[0].len() < MAX_SAMPLES && (samples[0].len() < MIN_SAMPLES || t.elapsed() < enough)
    {
        for ((imp, &b), s) in impls.iter().zip(&batch).zip(&mut samples) {
            let t = Instant::now();
            for _ in 0..b {
                imp.run(dst, grads);
            }
            s.push(t.elapsed().as_secs_f64() / f64::from(b));
        }
    }
    samples
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

/// The nearest-rank percentile `q` of sorted `s`.
fn percentile(s: &[f64], q: f64) -> f64 {
    s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

fn print_table(impls: &[Impl], selected: Kernel, sizes: &[usize], ks: &[usize], rows: &[Row]) {
    let gbps = |imp: Impl, size: usize, k: usize| {
        rows.iter()
            .find(|r| r.imp == imp.name() && r.size == size && r.k == k)
            .map_or(f64::NAN, |r| r.gbps)
    };
    let sel = selected.name();
    println!("\nGB/s of bytes read + written (median); {sel} is the selected kernel\n");
    print!("| size | K |");
    for imp in impls {
        print!(" {} |", imp.name());
    }
    println!(" {sel} / reference | {sel} / scalar_loop |");
    println!("| ---: | ---: |{}", " ---: |".repeat(impls.len() + 2));
    let mut worst_ref = (f64::INFINITY, 0, 0);
    let mut worst_scalar = (f64::INFINITY, 0, 0);
    for &size in sizes {
        for &k in ks {
            print!("| {} | {k} |", show_size(size));
            for &imp in impls {
                print!(" {:.1} |", gbps(imp, size, k));
            }
            let s = gbps(Impl::Kernel(selected), size, k);
            let vs_ref = s / gbps(Impl::Reference, size, k);
            let vs_loop = s / gbps(Impl::ScalarLoop, size, k);
            println!(" {vs_ref:.2} | {vs_loop:.2} |");
            // Against the slower of the scalar loop and the scalar kernel's equal.
            let vs_scalar = vs_loop.min(s / gbps(Impl::Kernel(Kernel::Scalar), size, k));
            if vs_ref < worst_ref.0 {
                worst_ref = (vs_ref, size, k);
            }
            if vs_scalar < worst_scalar.0 {
                worst_scalar = (vs_scalar, size, k);
            }
        }
    }
    println!();
    println!(
        "lowest {sel} / reference: {:.2} ({} x K={})",
        worst_ref.0,
        show_size(worst_ref.1),
        worst_ref.2
    );
    println!(
        "lowest {sel} / scalar (loop or kernel): {:.2} ({} x K={})",
        worst_scalar.0,
        show_size(worst_scalar.1),
        worst_scalar.2
    );
}

/// `65536` as `64 KiB`, `100` as `100 B`.
fn show_size(b: usize) -> String {
    match b {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// Parses `64K`, `64KiB`, `1M`, `1MiB`, `2G` or plain bytes: a gradient's size, a multiple of
/// 4 bytes up to 1 GiB.
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => {
            return Err(format!(
                "`{s}`: sizes are bytes, or a number with K, M or G"
            ))
        }
    };
    let v = num
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{s}` is not a size"))?;
    if v == 0 || !v.is_multiple_of(4) || v > MAX_PART_BYTES as u64 {
        return Err(format!(
            "{s}: a gradient's size must be a positive multiple of 4 bytes up to 1 GiB"
        ));
    }
    Ok(v)
}

/// The CPU's model name from /proc/cpuinfo.
pub(super) fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
