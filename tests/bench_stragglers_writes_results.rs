//! `hetsync bench stragglers` runs real trials and writes the table, the JSON rows and a PNG.

mod common;

use common::{scratch, Proc};

#[test]
fn bench_stragglers_writes_json_rows_and_a_png_graph() {
    let dir = scratch("bench");
    let (json, png) = (dir.join("out.json"), dir.join("out.png"));
    let mut p = Proc::spawn(
        "bench",
        &[
            "bench",
            "stragglers",
            "--workers",
            "2",
            "--fractions",
            "0,50",
            "--seconds",
            "0.5",
            "--compute-ms",
            "5",
            "--straggle-ms",
            "50",
            "--timeout-ms",
            "2",
            "--dim",
            "1000",
            "--json",
            json.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ],
    );
    p.success();

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "2 fractions x 2 policies");
    for r in rows {
        let policy = r["policy"].as_str().unwrap();
        assert!(policy == "naive" || policy == "timeout");
        let pct = r["stragglers_pct"].as_u64().unwrap();
        assert!(pct == 0 || pct == 50);
        assert!(r["rounds"].as_u64().unwrap() > 0, "{r}");
        assert!(r["updates_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        let mean = r["mean_participants"].as_f64().unwrap();
        assert!(mean > 0.0 && mean <= 2.0, "{r}");
        if policy == "naive" {
            // The naive barrier always waits for both workers.
            assert_eq!(mean, 2.0, "{r}");
        }
    }
    assert_eq!(v["config"]["workers"], 2);

    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "suspiciously small graph");
}
