//! `hetsync bench scale` drives a thousand workers against one server on this machine: every one
//! of them completes rounds, and an idle connection costs the server at most 64 KiB.

mod common;

use common::{scratch, Proc};

#[test]
fn a_thousand_workers_complete_rounds_on_one_server_within_64_kib_each() {
    let dir = scratch("bench-scale");
    let json = dir.join("scale.json");
    let mut p = Proc::spawn(
        "bench scale",
        &[
            "bench",
            "scale",
            "--workers",
            "1000",
            "--dims",
            "16",
            "--seconds",
            "2",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    // Waits at most common::HANG: a bound that only catches a hang.
    p.success();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["workers"], 1000, "{v}");
    assert!(
        v["rounds"].as_u64().unwrap() > 0,
        "no round completed with all 1000 workers: {v}\n{}",
        p.log()
    );
    assert!(v["rounds_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let baseline = v["server_rss_baseline_kib"].as_u64().unwrap();
    let idle = v["server_rss_idle_kib"].as_u64().unwrap();
    assert!(baseline > 0 && idle > 0, "{v}");
    let per_conn = v["rss_per_connection_kib"].as_f64().unwrap();
    assert!(
        per_conn <= 64.0,
        "an idle connection costs the server {per_conn:.1} KiB (target <= 64): {v}"
    );
}
