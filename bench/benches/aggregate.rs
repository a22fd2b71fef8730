//! Aggregation throughput: every gradient-sum kernel this CPU supports against the plain scalar
//! loop and the fused reference (`hetsync::engine::reference`: the same sum as a loop LLVM
//! auto-vectorises, reading the K arrays once and writing the model once, the pass a kernel
//! should match once data comes from memory), measured in the same run.
//!
//! For K = 1, 2, 4, 8 gradients of 64 KiB and 1 MiB (in cache) and 16 and 64 MiB (past the
//! last-level cache, 32 MiB here). Throughput counts every byte read and written: K gradients
//! and the model read, the model written, `(K + 2) * size`, so criterion's GB/s compare across
//! K and with memory bandwidth. The gradients sit in the server's own arena
//! ([`ArenaGradients`]), whose worker slots are staggered off 4 KiB multiples (the arena's rule,
//! reused rather than mirrored): K = 8 buffers all 4 KiB-aligned alike alias the same cache sets
//! and stream slower. The selected kernel (`Kernel::best`) is named `<kernel>_selected`. Report
//! ratios, not absolute figures: these machines are shared.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use hetsync::engine::reference::{fused_reference, scalar_loop};
use hetsync::engine::Kernel;
use hetsync_bench::ArenaGradients;

const ALPHA: f32 = -1e-3;

fn aggregate(c: &mut Criterion) {
    for size in [64usize << 10, 1 << 20, 16 << 20, 64 << 20] {
        let mut g = ArenaGradients::new(8, size / 4);
        for k in [1usize, 2, 4, 8] {
            let mut group = c.benchmark_group(format!("aggregate/{:05}KiB/k{k}", size >> 10));
            group.throughput(Throughput::Bytes(((k + 2) * size) as u64));
            if size >= 16 << 20 {
                // Up to ~0.2 s per scalar sum: the same few iterations in every sample.
                group
                    .sampling_mode(SamplingMode::Flat)
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(1));
            } else {
                group
                    .sample_size(20)
                    .warm_up_time(Duration::from_millis(200))
                    .measurement_time(Duration::from_millis(500));
            }
            g.with(k, |dst, grads| {
                group.bench_function("scalar_loop", |b| b.iter(|| scalar_loop(dst, grads, ALPHA)));
                group.bench_function("reference", |b| {
                    b.iter(|| fused_reference(dst, grads, ALPHA))
                });
                for kernel in Kernel::available() {
                    let name = if kernel == Kernel::best() {
                        format!("{}_selected", kernel.name())
                    } else {
                        kernel.name().to_string()
                    };
                    group.bench_function(name, |b| {
                        b.iter(|| kernel.sum_scaled_into(dst, grads, ALPHA))
                    });
                }
            });
            group.finish();
        }
    }
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
