//! Push+pull round trips of one tensor, 4 KiB to 64 MiB: through Het-Sync (a server on a thread,
//! one worker) against the bare reference of the same transport measured in the same run (a
//! blocking TCP echo of the same bytes; over RDMA a verbs write ping-pong). TCP always runs;
//! RDMA runs where a device exists (the Soft-RoCE guest in CI, where rxe is emulated and only
//! the ratios mean anything) and prints a SKIP line elsewhere.
//!
//! Throughput is the tensor's bytes per round (they cross twice), so criterion's GB/s compare
//! directly with `hetsync bench transport` and `compare.sh`. Sizes: `HETSYNC_BENCH_SIZES`
//! (bytes, comma separated) overrides the default list.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hetsync::roundtrip::{HetSync, RawTcp, RoundTrip};
use hetsync_transport::any::{Choice, RdmaSelect};

fn sizes() -> Vec<usize> {
    match std::env::var("HETSYNC_BENCH_SIZES") {
        Ok(s) => s
            .split(',')
            .map(|x| match x.trim().parse::<usize>() {
                Ok(n) if n > 0 && n.is_multiple_of(4) => n,
                _ => panic!("HETSYNC_BENCH_SIZES: {x:?} is not a positive multiple of 4 bytes"),
            })
            .collect(),
        Err(_) => vec![4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20],
    }
}

fn group(c: &mut Criterion, transport: Choice, name: &str) {
    let rdma = RdmaSelect::default();
    let spin = hetsync_transport::default_spin();
    let mut g = c.benchmark_group(format!("transport_{name}"));
    for size in sizes() {
        // Large rounds take tens of milliseconds: fewer samples, so the group stays in minutes.
        g.sample_size(if size >= 16 << 20 { 10 } else { 30 });
        g.throughput(Throughput::Bytes(size as u64));
        let mut hs = HetSync::start(size, transport, &rdma, None, spin).expect("Het-Sync starts");
        g.bench_function(BenchmarkId::new("hetsync", size), |b| {
            b.iter(|| hs.round().expect("a Het-Sync round"))
        });
        drop(hs);
        let mut raw = reference(transport, &rdma, size);
        g.bench_function(BenchmarkId::new("raw", size), |b| {
            b.iter(|| raw.round().expect("a reference round"))
        });
    }
    g.finish();
}

fn reference(transport: Choice, rdma: &RdmaSelect, size: usize) -> Box<dyn RoundTrip> {
    if transport == Choice::Rdma {
        #[cfg(feature = "rdma")]
        return Box::new(hetsync::roundtrip::RawRdma::start(size, rdma).expect("the ping-pong"));
    }
    let _ = rdma;
    Box::new(RawTcp::start(size).expect("the echo"))
}

fn transport(c: &mut Criterion) {
    if std::env::var_os("HETSYNC_BENCH_NO_TCP").is_none() {
        group(c, Choice::Tcp, "tcp");
    }
    match rdma_device() {
        Ok(()) => group(c, Choice::Rdma, "rdma"),
        Err(why) if std::env::var_os("HETSYNC_REQUIRE_RDMA").is_some() => {
            panic!("HETSYNC_REQUIRE_RDMA is set but RDMA is not usable: {why}")
        }
        Err(why) => eprintln!("SKIP: transport_rdma: {why}"),
    }
}

#[cfg(feature = "rdma")]
fn rdma_device() -> Result<(), String> {
    hetsync_transport::rdma::pingpong::available(&Default::default()).map_err(|e| e.to_string())
}

#[cfg(not(feature = "rdma"))]
fn rdma_device() -> Result<(), String> {
    Err("built without the rdma feature".into())
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = transport
}
criterion_main!(benches);
