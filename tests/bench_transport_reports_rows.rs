//! `hetsync bench transport` measures Het-Sync and the raw TCP echo at each size and writes the
//! table and the JSON rows; on a host without RDMA, `both` says it skipped RDMA and `rdma` fails
//! saying why.

mod common;

use common::{scratch, Proc};

#[test]
fn bench_transport_writes_a_row_per_transport_path_and_size() {
    let dir = scratch("bench-transport");
    let json = dir.join("transport.json");
    let mut p = Proc::spawn(
        "bench transport",
        &[
            "bench",
            "transport",
            "--transport",
            "tcp",
            "--sizes",
            "4K,256K,1M",
            "--partition-kib",
            "64",
            "--seconds",
            "0.2",
            "--reps",
            "2",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    p.success();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["machine"].as_str().unwrap().contains("CPU"), "{v}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "3 sizes x (hetsync, raw): {v}");
    for (i, size) in [4096u64, 262144, 1048576].into_iter().enumerate() {
        for (j, path) in ["hetsync", "raw"].into_iter().enumerate() {
            let r = &rows[2 * i + j];
            assert_eq!(r["transport"], "tcp", "{r}");
            assert_eq!(r["path"], path, "{r}");
            assert_eq!(r["size"].as_u64(), Some(size), "{r}");
            let (p50, p99) = (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap());
            assert!(p50 > 0.0 && p99 >= p50, "{r}");
            let gbps = r["gbps"].as_f64().unwrap();
            // The bytes cross twice per round: GB/s from the mean can not be far above what
            // the median says (a generous bound that only catches a wrong formula).
            assert!(gbps > 0.0 && gbps < 4.0 * size as f64 / p50 / 1e3, "{r}");
            assert!(r["rounds"].as_u64().unwrap() >= 10, "{r}");
        }
    }
    assert!(p.log().contains("tcp 1 MiB: repetition 2/2"), "{}", p.log());
}

#[test]
fn rdma_without_a_device_is_skipped_under_both_and_an_error_when_asked_for() {
    if std::path::Path::new("/sys/class/infiniband").exists() {
        eprintln!("SKIP: this host has RDMA devices; the guest runs the RDMA bench");
        return;
    }
    let mut p = Proc::spawn(
        "bench transport",
        &["bench", "transport", "--transport", "rdma", "--sizes", "4K"],
    );
    assert!(!p.wait().success());
    let log = p.log();
    assert!(
        log.contains("--transport rdma:") && log.contains("RDMA"),
        "{log}"
    );
    let mut p = Proc::spawn(
        "bench transport",
        &[
            "bench",
            "transport",
            "--sizes",
            "4K",
            "--seconds",
            "0.1",
            "--reps",
            "1",
        ],
    );
    p.success();
    assert!(p.log().contains("SKIP rdma:"), "{}", p.log());
}
