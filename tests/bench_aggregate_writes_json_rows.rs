//! `hetsync bench aggregate` measures every kernel, the scalar loop and the fused reference, and
//! writes a machine line and one JSON row per (size, K, implementation). Timings are not asserted.

mod common;

use common::{scratch, Proc};
use hetsync::engine::Kernel;

#[test]
fn bench_aggregate_writes_a_row_per_size_k_and_implementation() {
    let json = scratch("bench-aggregate").join("out.jsonl");
    let mut p = Proc::spawn(
        "bench-aggregate",
        &[
            "bench",
            "aggregate",
            "--sizes",
            "4K,68",
            "--k",
            "1,3",
            "--seconds",
            "0.01",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    p.success();

    let text = std::fs::read_to_string(&json).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let machine = &lines[0];
    assert_eq!(machine["kind"], "machine", "{machine}");
    assert!(!machine["cpu"].as_str().unwrap().is_empty(), "{machine}");
    assert!(machine["nproc"].as_u64().unwrap() >= 1, "{machine}");
    let kernels: Vec<&str> = Kernel::available().into_iter().map(Kernel::name).collect();
    assert_eq!(machine["kernels"], serde_json::json!(kernels), "{machine}");
    assert_eq!(machine["selected"], Kernel::best().name(), "{machine}");

    let mut impls = vec!["scalar_loop", "reference"];
    impls.extend(&kernels);
    let rows = &lines[1..];
    assert_eq!(
        rows.len(),
        2 * 2 * impls.len(),
        "2 sizes x 2 K x every implementation"
    );
    for size in [4096, 68] {
        for k in [1, 3] {
            for imp in &impls {
                let r = rows
                    .iter()
                    .find(|r| r["size"] == size && r["k"] == k && r["impl"] == *imp)
                    .unwrap_or_else(|| panic!("no row for {imp} at size {size}, K={k}"));
                assert_eq!(r["kind"], "aggregate", "{r}");
                let selected = *imp == Kernel::best().name();
                assert_eq!(r["selected"], selected, "{r}");
                let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
                assert!(p50 > 0.0 && p99 >= p50, "{r}");
                assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
            }
        }
    }
    // Progress on stderr, one line per (size, K).
    assert!(p.log().contains("[4/4] 68 B x K=3"), "{}", p.log());
}
