//! End to end over loopback: a job of three tensors (1, 1,000 and 300,000 floats), 4 workers.
//! Under `naive` every key reaches its closed form, and partitions change nothing: the same job
//! cut into 64 KiB parts saves a byte-identical model, and `--dims D` is `--dim D`. Under
//! `timeout` with a straggler, each key's final model equals a replay of its own logged rounds.

mod common;

use common::{job, max_abs_diff, parse_rounds, read_model, replay_key, scratch, summary_count};
use hetsync::worker::mean_target;

const DIMS: [usize; 3] = [1, 1000, 300_000];

/// Runs a server and 4 workers with `model` (e.g. ["--dims", "1,1000"]) and the extra flags;
/// returns the server's log.
#[test]
fn naive_reaches_every_keys_closed_form_and_partitions_change_no_byte() {
    let dir = scratch("many-naive");
    let (whole, parts) = (dir.join("whole.f32"), dir.join("parts.f32"));
    let naive = ["--policy", "naive", "--lr", "0.5", "--rounds", "20"];
    let workers: [&[&str]; 4] = [&["--compute-ms", "0", "--rounds", "20"]; 4];
    let dims = ["--dims", "1,1000,300000"];
    let whole_log = job(
        &dims,
        &[&naive[..], &["--partition-kib", "2048"]].concat(),
        &workers,
        &whole,
    );
    assert!(whole_log.contains("finished: 20 rounds"), "{whole_log}");
    assert!(
        whole_log.contains("3 parts"),
        "one part per tensor: {whole_log}"
    );
    let parted_log = job(
        &dims,
        &[&naive[..], &["--partition-kib", "64"]].concat(),
        &workers,
        &parts,
    );
    // 300,000 floats in parts of 16,384: 19 parts, plus one each for the small tensors.
    assert!(parted_log.contains("21 parts"), "{parted_log}");

    let got = read_model(&whole);
    assert_eq!(got.len(), 301_001, "every key, in key order");
    let mut at = 0;
    for (key, &dim) in DIMS.iter().enumerate() {
        let mean = mean_target(4, key, dim, 1);
        let decay = 1.0 - 0.5f32.powi(20);
        let closed: Vec<f32> = mean.iter().map(|m| m * decay).collect();
        let diff = max_abs_diff(&got[at..at + dim], &closed);
        assert!(diff < 1e-5, "key {key} is off its closed form by {diff}");
        at += dim;
    }
    assert!(
        std::fs::read(&whole).unwrap() == std::fs::read(&parts).unwrap(),
        "the partitioned job saved another model"
    );

    // The one-tensor spelling is the same job.
    let (a, b) = (dir.join("dims.f32"), dir.join("dim.f32"));
    job(&["--dims", "300000"], &naive, &workers, &a);
    job(&["--dim", "300000"], &naive, &workers, &b);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    assert_eq!(std::fs::read(&a).unwrap().len(), 300_000 * 4);
}

#[test]
fn timeout_with_a_straggler_matches_each_keys_replay() {
    let dir = scratch("many-timeout");
    let (model, log) = (dir.join("model.f32"), dir.join("rounds.jsonl"));
    let fast: &[&str] = &["--compute-ms", "5"];
    let slow: &[&str] = &["--compute-ms", "5", "--straggle-ms", "80"];
    let server_log = job(
        &["--dims", "1,1000,300000"],
        &[
            "--policy",
            "timeout",
            "--timeout-ms",
            "5",
            "--lr",
            "0.3",
            "--rounds",
            "25",
            "--partition-kib",
            "256",
            "--round-log",
            log.to_str().unwrap(),
        ],
        &[fast, fast, fast, slow],
        &model,
    );
    assert!(server_log.contains("finished: 25 rounds"), "{server_log}");
    let rounds = parse_rounds(&std::fs::read_to_string(&log).unwrap());
    for key in 0..3 {
        let mine: Vec<_> = rounds.iter().filter(|r| r.key == key).collect();
        assert!(mine.len() >= 25, "key {key} logged {} rounds", mine.len());
        for (n, r) in mine.iter().enumerate() {
            assert_eq!(r.round, n as u64, "key {key}'s rounds are logged in order");
        }
    }
    assert!(
        rounds
            .iter()
            .any(|r| r.cause == "timeout" && !r.participants.contains(&3)),
        "no round closed without the straggler"
    );
    // A late push of a key counts once, however many parts it has.
    let folded = rounds
        .iter()
        .flat_map(|r| &r.late)
        .filter(|l| l.3.is_empty() || l.3.contains(&0))
        .count() as u64;
    assert_eq!(summary_count(&server_log, "folded"), folded, "{server_log}");
    let got = read_model(&model);
    let mut at = 0;
    for (key, &dim) in DIMS.iter().enumerate() {
        let want = replay_key(&rounds, 4, key, dim, 256 * 1024 / 4, 0.3);
        let diff = max_abs_diff(&got[at..at + dim], &want);
        assert!(diff < 1e-4, "key {key} is off its replay by {diff}");
        at += dim;
    }
}
