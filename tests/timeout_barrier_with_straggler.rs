//! End to end over loopback: the `timeout` barrier with one straggler among 4 workers. Rounds
//! close without the straggler; its late gradients are dropped; and the final model equals the
//! replay of the update rule over the participants the server logged for each round.

mod common;

use common::{max_abs_diff, read_model, scratch, Proc};
use hetsync::worker::target;

#[test]
fn timeout_policy_leaves_the_straggler_behind_and_the_model_matches_the_replay() {
    let dir = scratch("timeout");
    let model = dir.join("model.f32");
    let rounds_log = dir.join("rounds.jsonl");
    let (dim, lr) = (4099usize, 0.3f32);
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "4",
        "--dim",
        "4099",
        "--policy",
        "timeout",
        "--timeout-ms",
        "5",
        "--lr",
        "0.3",
        "--rounds",
        "30",
        "--save-model",
        model.to_str().unwrap(),
        "--round-log",
        rounds_log.to_str().unwrap(),
    ]);
    let mut ws: Vec<Proc> = (0..4)
        .map(|r| {
            let mut extra = vec!["--compute-ms", "5"];
            if r == 3 {
                extra.extend_from_slice(&["--straggle-ms", "80"]);
            }
            Proc::worker(&addr, r, dim, &extra)
        })
        .collect();
    server.success();
    for w in &mut ws {
        w.success();
    }

    // Replay: m <- m - lr * mean_{p in P_r}(m - t_p), in f64.
    let targets: Vec<Vec<f32>> = (0..4).map(|r| target(r, dim, 1)).collect();
    let mut m = vec![0f64; dim];
    let text = std::fs::read_to_string(&rounds_log).unwrap();
    let mut timeouts_without_straggler = 0;
    let mut n = 0;
    for line in text.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            rec["round"].as_u64().unwrap(),
            n,
            "rounds are logged in order"
        );
        n += 1;
        let parts: Vec<usize> = rec["participants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        assert!(!parts.is_empty());
        if rec["cause"] == "timeout" && !parts.contains(&3) {
            timeouts_without_straggler += 1;
        }
        let k = parts.len() as f64;
        for (i, mi) in m.iter_mut().enumerate() {
            let g: f64 = parts
                .iter()
                .map(|&p| *mi - f64::from(targets[p][i]))
                .sum::<f64>()
                / k;
            *mi -= f64::from(lr) * g;
        }
    }
    assert_eq!(n, 30, "the server logged every round");
    assert!(
        timeouts_without_straggler > 0,
        "no round closed without the straggler:\n{text}"
    );
    let replay: Vec<f32> = m.iter().map(|&x| x as f32).collect();
    let got = read_model(&model);
    assert!(
        max_abs_diff(&got, &replay) < 1e-4,
        "off the replay by {}",
        max_abs_diff(&got, &replay)
    );
    let log = server.log();
    assert!(log.contains("late gradients"), "{log}");
}
