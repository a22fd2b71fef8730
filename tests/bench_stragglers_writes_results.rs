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
            "--policies",
            "naive,timeout,adaptive,bsp,ssp,asp",
            "--staleness",
            "2",
            "--straggler-mode",
            "transient",
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
    assert_eq!(rows.len(), 12, "2 fractions x 6 policies");
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        let policy = r["policy"].as_str().unwrap();
        seen.insert(policy.to_string());
        assert_eq!(r["straggler_mode"], "transient", "{r}");
        let pct = r["stragglers_pct"].as_u64().unwrap();
        assert!(pct == 0 || pct == 50);
        assert!(r["rounds"].as_u64().unwrap() > 0, "{r}");
        let updates = r["updates_per_sec"].as_f64().unwrap();
        let applied = r["pushes_applied_per_sec"].as_f64().unwrap();
        assert!(updates > 0.0 && applied > 0.0, "{r}");
        let mean = r["mean_participants"].as_f64().unwrap();
        if ["bsp", "ssp", "asp"].contains(&policy) {
            // A vector clock's update is one push from each worker's worth.
            assert!((updates - applied / 2.0).abs() < 1e-9, "{r}");
            assert_eq!(mean, 0.0, "{r}");
        } else {
            assert!(mean > 0.0 && mean <= 2.0, "{r}");
            assert!(applied >= updates * mean * 0.99, "{r}");
        }
        if policy == "naive" {
            // The naive barrier always waits for both workers.
            assert_eq!(mean, 2.0, "{r}");
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(v["config"]["workers"], 2);
    assert_eq!(v["config"]["staleness"], 2);

    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "suspiciously small graph");
}

#[test]
fn demo_writes_both_seeds_tables() {
    let dir = scratch("demo");
    let mut p = Proc::spawn(
        "demo",
        &["demo", "--seconds", "0.2", "--out", dir.to_str().unwrap()],
    );
    p.success();
    let rows = |name: &str| -> Vec<(String, String, u64)> {
        let path = dir.join(format!("{name}.json"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let png = std::fs::read(dir.join(format!("{name}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{name}.png is not a PNG"
        );
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["policy"].as_str().unwrap().to_string(),
                    r["straggler_mode"].as_str().unwrap().to_string(),
                    r["stragglers_pct"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let het_sync = rows("persistent");
    assert_eq!(het_sync.len(), 3 * 4, "{het_sync:?}");
    assert!(het_sync
        .iter()
        .all(|r| r.1 == "persistent" && ["naive", "timeout", "adaptive"].contains(&r.0.as_str())));
    let angel = rows("transient");
    assert_eq!(angel.len(), 4 * 3, "{angel:?}");
    assert!(angel.iter().all(|r| r.1 == "transient"
        && ["naive", "bsp", "ssp", "asp"].contains(&r.0.as_str())
        && r.2 <= 50));
}
