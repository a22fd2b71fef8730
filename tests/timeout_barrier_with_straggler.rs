//! End to end over loopback: the `timeout` barrier with one straggler among 4 workers. Rounds
//! close without the straggler; its late gradients are dropped; and the final model equals the
//! replay of the update rule over the participants the server logged for each round.

mod common;

use common::{max_abs_diff, parse_rounds, read_model, replay, scratch, Proc};

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

    let rounds = parse_rounds(&std::fs::read_to_string(&rounds_log).unwrap());
    assert_eq!(rounds.len(), 30, "the server logged every round");
    for (n, r) in rounds.iter().enumerate() {
        assert_eq!(r.round, n as u64, "rounds are logged in order");
        assert!(!r.participants.is_empty());
    }
    assert!(
        rounds
            .iter()
            .any(|r| r.cause == "timeout" && !r.participants.contains(&3)),
        "no round closed without the straggler: {rounds:?}"
    );
    let replay = replay(&rounds, 4, dim, f64::from(lr));
    let got = read_model(&model);
    assert!(
        max_abs_diff(&got, &replay) < 1e-4,
        "off the replay by {}",
        max_abs_diff(&got, &replay)
    );
    // The straggler's pushes arrive after their rounds closed: counted as late, not lost silently.
    let log = server.log();
    let late: u64 = log
        .lines()
        .find(|l| l.contains("finished:"))
        .and_then(|l| l.split("late gradients ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no late-gradient count in the summary:\n{log}"));
    assert!(late >= 1, "no late gradient counted:\n{log}");
}
