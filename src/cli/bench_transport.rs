//! `hetsync bench transport`: push+pull round trips of one tensor through Het-Sync against the
//! bare reference of the same transport (a blocking TCP echo; a verbs ping-pong), per size, with
//! medians, 99th percentiles, GB/s and their ratio, as a table and as JSON.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::CliError;
use crate::roundtrip::{self, HetSync, RawTcp, RoundTrip, Samples};
use hetsync_transport::any::{Choice, RdmaSelect};

/// Which transports `bench transport` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Which {
    /// TCP only.
    Tcp,
    /// RDMA only (fails without a device).
    Rdma,
    /// TCP, and RDMA when this host has a device (else a line says it was skipped).
    Both,
}

/// The options of `hetsync bench transport`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  hetsync bench transport
  hetsync bench transport --sizes 4K,1M,64M --seconds 2 --json transport.json
  hetsync bench transport --transport rdma --rdma-device mlx5_0
  HETSYNC_SPIN_US=0 hetsync bench transport --transport tcp   # no spinning")]
pub(crate) struct TransportBenchArgs {
    /// Which transports to measure.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    transport: Which,
    /// Tensor sizes, comma separated: bytes (a multiple of 4), or with K, M or G (KiB, MiB,
    /// GiB); at most 1G.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M", value_parser = super::bench_aggregate::parse_size)]
    sizes: Vec<u64>,
    /// Seconds of timed rounds per size, path and repetition.
    #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Repetitions, Het-Sync and the reference taking turns (the machine's drift hits both).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    reps: u32,
    /// The server's partition size in KiB (default: the server's).
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..=(1 << 20)))]
    partition_kib: Option<u32>,
    /// Microseconds a wait polls before it sleeps, on both sides (default: 50 with more than one
    /// CPU, else 0).
    #[arg(long, value_name = "US", env = "HETSYNC_SPIN_US", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    spin_us: Option<u32>,
    /// The RDMA device (default: the first one).
    #[arg(long, value_name = "NAME", env = "HETSYNC_RDMA_DEVICE")]
    rdma_device: Option<String>,
    /// The GID index (default: the RoCE v2 GID with an IPv4 address).
    #[arg(long, value_name = "N", env = "HETSYNC_GID_INDEX")]
    gid_index: Option<u8>,
    /// Write the rows as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 3600.0 => Ok(x),
        _ => Err(format!("{s:?}: give seconds, more than 0 and at most 3600")),
    }
}

/// One measured (transport, path, size), as JSON.
#[derive(Debug, Serialize)]
struct Row {
    transport: &'static str,
    path: &'static str,
    size: usize,
    p50_us: f64,
    p99_us: f64,
    gbps: f64,
    rounds: usize,
}

#[derive(Serialize)]
struct Output<'a> {
    machine: String,
    spin_us: u64,
    partition_kib: Option<u32>,
    rows: &'a [Row],
}

/// "N CPUs, model name", for the output's machine line.
pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    format!("{cpus} CPUs, {}", super::bench_aggregate::cpu_model())
}

/// A size for people: 4 KiB, 16 MiB.
pub(crate) fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub(super) fn run(a: &TransportBenchArgs) -> Result<(), CliError> {
    let spin = a
        .spin_us
        .map_or_else(hetsync_transport::default_spin, |us| {
            Duration::from_micros(us.into())
        });
    let rdma = RdmaSelect {
        device: a.rdma_device.clone(),
        gid_index: a.gid_index,
    };
    let mut transports = Vec::new();
    if a.transport != Which::Rdma {
        transports.push(Choice::Tcp);
    }
    if a.transport != Which::Tcp {
        match rdma_here(&rdma) {
            Ok(()) => transports.push(Choice::Rdma),
            Err(why) if a.transport == Which::Both => {
                eprintln!("hetsync bench transport: SKIP rdma: {why}");
            }
            Err(why) => return Err(format!("--transport rdma: {why}").into()),
        }
    }
    let machine = machine();
    eprintln!(
        "hetsync bench transport: {machine}; spin {} us; {} s x {} repetitions per size and path",
        spin.as_micros(),
        a.seconds,
        a.reps
    );
    let partition = a.partition_kib.map(|k| k as usize * 1024);
    let mut rows = Vec::new();
    for &choice in &transports {
        let name = if choice == Choice::Rdma {
            "rdma"
        } else {
            "tcp"
        };
        for size in a.sizes.iter().map(|&s| s as usize) {
            let (hs, raw) = measure_size(a, choice, &rdma, size, partition, spin)?;
            for (path, s) in [("hetsync", &hs), ("raw", &raw)] {
                rows.push(Row {
                    transport: name,
                    path,
                    size,
                    p50_us: s.quantile_us(0.5),
                    p99_us: s.quantile_us(0.99),
                    gbps: s.gbps(size),
                    rounds: s.secs.len(),
                });
            }
        }
    }
    print_table(&rows, &machine);
    if let Some(path) = &a.json {
        let out = Output {
            machine,
            spin_us: spin.as_micros() as u64,
            partition_kib: a.partition_kib,
            rows: &rows,
        };
        let text = serde_json::to_string_pretty(&out)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("hetsync bench transport: wrote {}", path.display());
    }
    Ok(())
}

#[cfg(feature = "rdma")]
fn rdma_here(rdma: &RdmaSelect) -> Result<(), String> {
    let cfg = hetsync_transport::rdma::RdmaConfig {
        device: rdma.device.clone(),
        gid_index: rdma.gid_index,
    };
    hetsync_transport::rdma::pingpong::available(&cfg).map_err(|e| e.to_string())
}

#[cfg(not(feature = "rdma"))]
fn rdma_here(_: &RdmaSelect) -> Result<(), String> {
    Err("this hetsync was built without RDMA support".into())
}

/// The reference of `choice` for `size` bytes.
fn reference(
    choice: Choice,
    rdma: &RdmaSelect,
    size: usize,
) -> Result<Box<dyn RoundTrip>, CliError> {
    if choice == Choice::Rdma {
        #[cfg(feature = "rdma")]
        return Ok(Box::new(roundtrip::RawRdma::start(size, rdma)?));
    }
    let _ = rdma;
    Ok(Box::new(RawTcp::start(size)?))
}

/// Het-Sync and the reference at one size, taking turns `reps` times.
fn measure_size(
    a: &TransportBenchArgs,
    choice: Choice,
    rdma: &RdmaSelect,
    size: usize,
    partition: Option<usize>,
    spin: Duration,
) -> Result<(Samples, Samples), CliError> {
    let time = Duration::from_secs_f64(a.seconds);
    // Enough rounds for a 99th percentile where rounds are short; a few where they are long.
    let (min, max) = (5, 10_000_000);
    let warmup = if size >= 16 << 20 { 2 } else { 20 };
    let mut hs = HetSync::start(size, choice, rdma, partition, spin)?;
    let mut raw = reference(choice, rdma, size)?;
    let (mut h, mut r) = (Samples::default(), Samples::default());
    let tty = std::io::stderr().is_terminal();
    for rep in 1..=a.reps {
        let label = format!(
            "{} {}: repetition {rep}/{}",
            if choice == Choice::Rdma {
                "rdma"
            } else {
                "tcp"
            },
            human(size),
            a.reps
        );
        if tty {
            eprint!("\r{label}   ");
        } else {
            eprintln!("{label}");
        }
        // The order alternates, so neither path always runs first after the other.
        if rep % 2 == 1 {
            h.merge(roundtrip::measure(&mut hs, warmup, time, min, max)?);
            r.merge(roundtrip::measure(raw.as_mut(), warmup, time, min, max)?);
        } else {
            r.merge(roundtrip::measure(raw.as_mut(), warmup, time, min, max)?);
            h.merge(roundtrip::measure(&mut hs, warmup, time, min, max)?);
        }
    }
    if tty {
        eprintln!();
    }
    Ok((h, r))
}

fn print_table(rows: &[Row], machine: &str) {
    println!("## Push+pull round trips of one tensor: Het-Sync against the bare transport\n");
    println!("machine: {machine}\n");
    println!("| transport | size | Het-Sync p50 us | p99 us | GB/s | raw p50 us | p99 us | GB/s | Het-Sync/raw |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for pair in rows.chunks(2) {
        let [h, r] = pair else { continue };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} | {:.3} | {:.2} |",
            h.transport,
            human(h.size),
            h.p50_us,
            h.p99_us,
            h.gbps,
            r.p50_us,
            r.p99_us,
            r.gbps,
            h.gbps / r.gbps
        );
    }
    println!(
        "\nGB/s = tensor bytes / mean round time (the bytes cross twice). Het-Sync/raw above 1: faster than the bare reference (it overlaps both directions)."
    );
}
