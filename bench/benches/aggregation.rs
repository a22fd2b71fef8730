//! Aggregation throughput: every available sum kernel against a memory reference measured in the
//! same run (`copy_from_slice` of one gradient into the model: one read and one write per float).
//!
//! Throughput is counted as gradient bytes read, so `K = 4` at the reference's speed means the
//! kernel streams four gradients as fast as memcpy streams one. Report ratios, not absolute
//! figures: these machines are shared.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hetsync::engine::Kernel;
use hetsync_bench::Gradients;

fn aggregation(c: &mut Criterion) {
    // 256 KiB stays in L2; 16 MiB per gradient is well past the last-level cache.
    for n in [64 * 1024usize, 4 << 20] {
        let mut group = c.benchmark_group(format!("sum_{}KiB", n * 4 / 1024));
        group.sample_size(20);
        for k in [1usize, 4] {
            let mut g = Gradients::new(k, n);
            group.throughput(Throughput::Bytes((k * n * 4) as u64));
            if k == 1 {
                group.bench_function(BenchmarkId::new("reference_memcpy", k), |b| {
                    b.iter(|| g.model.copy_from_slice(&g.grads[0]))
                });
            }
            let grads = g.grads.clone();
            let views: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            for kernel in Kernel::available() {
                group.bench_function(BenchmarkId::new(kernel.name(), k), |b| {
                    b.iter(|| kernel.sum_scaled_into(&mut g.model, &views, -1e-3))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, aggregation);
criterion_main!(benches);
