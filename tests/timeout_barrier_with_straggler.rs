//! End to end over loopback: the `timeout` barrier with one straggler among 4 workers. Rounds
//! close without the straggler, and the final model equals the replay of the update rule over
//! what the server logged for each round: with `--late drop` the on-time participants only; with
//! `--late fold` (the default) also the straggler's late gradients, each added into the next
//! round's sum with weight 1/(1+s), s = rounds late, which moves the model measurably.

mod common;

use std::path::PathBuf;

use common::{job, max_abs_diff, parse_rounds, read_model, replay, scratch, summary_count};

const DIM: usize = 4099;
const LR: f32 = 0.3;

/// 30 rounds of the timeout barrier at 5 ms, the last worker 10x slower than 5 ms, with
/// `--late late`; returns the model file, the round log and the server's log.
fn straggler_job(late: &str, straggle_ms: &str) -> (PathBuf, String, String) {
    let dir = scratch(&format!("timeout-{late}"));
    let (model, rounds_log) = (dir.join("model.f32"), dir.join("rounds.jsonl"));
    let fast: &[&str] = &["--compute-ms", "5"];
    let slow: &[&str] = &["--compute-ms", "5", "--straggle-ms", straggle_ms];
    let log = job(
        &["--dim", &DIM.to_string()],
        &[
            "--policy",
            "timeout",
            "--timeout-ms",
            "5",
            "--late",
            late,
            "--lr",
            &LR.to_string(),
            "--rounds",
            "30",
            "--round-log",
            rounds_log.to_str().unwrap(),
        ],
        &[fast, fast, fast, slow],
        &model,
    );
    (model, std::fs::read_to_string(&rounds_log).unwrap(), log)
}

#[test]
fn timeout_policy_leaves_the_straggler_behind_and_the_model_matches_the_replay() {
    let (model, rounds_log, log) = straggler_job("drop", "80");
    let rounds = parse_rounds(&rounds_log);
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
    let replay = replay(&rounds, 4, DIM, f64::from(LR));
    let got = read_model(&model);
    assert!(
        max_abs_diff(&got, &replay) < 1e-4,
        "off the replay by {}",
        max_abs_diff(&got, &replay)
    );
    // The straggler's pushes arrive after their rounds closed: counted as dropped, not lost
    // silently, and none folded.
    assert!(
        summary_count(&log, "dropped") >= 1,
        "no late gradient counted:\n{log}"
    );
    assert_eq!(summary_count(&log, "folded"), 0, "{log}");
    assert!(rounds.iter().all(|r| r.late.is_empty()));
}

#[test]
fn folded_late_gradients_change_the_model_by_what_their_weights_predict() {
    let (model, rounds_log, log) = straggler_job("fold", "40");
    let mut rounds = parse_rounds(&rounds_log);
    assert_eq!(rounds.len(), 30);
    let folded: Vec<_> = rounds
        .iter()
        .flat_map(|r| r.late.iter().map(move |l| (r.round, l.clone())))
        .collect();
    assert!(
        !folded.is_empty(),
        "the straggler's gradients were never folded:\n{log}"
    );
    // The straggler is late; on a loaded machine a fast worker may miss the 5 ms timeout now
    // and then too, and is folded by the same rule, which the replay below checks for all.
    assert!(
        folded.iter().any(|(_, (worker, ..))| *worker == 3),
        "the straggler's gradients were never the late ones: {folded:?}"
    );
    for (round, (_, clock, weight, _)) in folded.iter().cloned() {
        assert!(clock < round);
        let want = 1.0 / (1.0 + (round - clock) as f64);
        assert!(
            (weight - want).abs() < 1e-6,
            "weight {weight} for {} rounds late",
            round - clock
        );
    }
    assert_eq!(summary_count(&log, "folded"), folded.len() as u64, "{log}");

    let got = read_model(&model);
    let predicted = replay(&rounds, 4, DIM, f64::from(LR));
    let off = max_abs_diff(&got, &predicted);
    assert!(off < 1e-4, "off the weighted replay by {off}");
    // Dropping them instead would end elsewhere, well beyond the tolerance above.
    rounds.iter_mut().for_each(|r| r.late.clear());
    let dropped = replay(&rounds, 4, DIM, f64::from(LR));
    let moved = max_abs_diff(&dropped, &predicted);
    assert!(moved > 1e-2, "folding changed the model by only {moved}");
}
