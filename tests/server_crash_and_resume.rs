//! The server is killed with SIGKILL mid-run; `--resume` continues from its last checkpoint
//! with the model bit for bit as saved, the workers reconnect by themselves, and training ends
//! with the right model (the naive closed form over every round, before and after the crash).
//! (Its numbers depend on how far the first run got before the kill, which timing decides.)

mod common;

use std::time::{Duration, Instant};

use common::{read_model, scratch, Proc};
use hetsync::server::checkpoint::{job_hash, load, Shape};

const DIM: usize = 10_007;
const SHAPE: Shape = Shape {
    parts: 1,
    workers: 4,
    floats: DIM,
};

#[test]
fn a_killed_server_resumes_from_its_checkpoint_and_workers_carry_on() {
    let dir = scratch("resume");
    let (ckpt, model, replayed) = (
        dir.join("ckpt"),
        dir.join("model.f32"),
        dir.join("at-ckpt.f32"),
    );
    let job = job_hash(&[DIM], hetsync::server::DEFAULT_PARTITION_BYTES, 4, "naive");
    let common_args = [
        "--workers",
        "4",
        "--dim",
        "10007",
        "--policy",
        "naive",
        "--lr",
        "0.5",
    ];
    let mut first_args = common_args.to_vec();
    first_args.extend(["--rounds", "100000", "--checkpoint", ckpt.to_str().unwrap()]);
    first_args.extend(["--checkpoint-every", "3"]);
    let (mut first, addr) = Proc::server(&first_args);
    let mut ws: Vec<Proc> = (0..4)
        .map(|r| Proc::worker(&addr, r, DIM, &["--compute-ms", "5", "--workers", "4"]))
        .collect();
    // Let it write a few checkpoints, then kill it mid-run.
    let deadline = Instant::now() + common::HANG;
    while load(&ckpt, job, SHAPE).map_or(true, |s| s.seq < 3) {
        assert!(
            Instant::now() < deadline,
            "no checkpoints:\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
    let _ = first.wait();
    let saved = load(&ckpt, job, SHAPE).unwrap();
    let at = saved.rounds[0];
    assert!(at >= 9, "checkpoint {} at round {at}", saved.seq);

    // Resuming restores the model bit for bit: a run that is already done saves it unchanged.
    let mut check_args = common_args.to_vec();
    let at_s = at.to_string();
    check_args.extend(["--resume", ckpt.to_str().unwrap(), "--rounds", &at_s]);
    check_args.extend(["--save-model", replayed.to_str().unwrap()]);
    let (mut check, _) = Proc::server(&check_args);
    check.success();
    assert!(
        check.log().contains(&format!("at job round {at}")),
        "{}",
        check.log()
    );
    let bits: Vec<u32> = read_model(&replayed).iter().map(|x| x.to_bits()).collect();
    let want: Vec<u32> = saved.model.iter().map(|x| x.to_bits()).collect();
    assert!(
        bits == want,
        "the resumed model is not the checkpoint's, bit for bit"
    );

    // The real restart, on the address the workers keep trying.
    let mut again_args = vec!["server", "--listen", &addr, "--progress", "0"];
    again_args.extend_from_slice(&common_args);
    // However far the first run got, the resumed one trains 200 more rounds.
    let last = at + 200;
    let last_s = last.to_string();
    again_args.extend(["--rounds", &last_s, "--resume", ckpt.to_str().unwrap()]);
    let rounds_log = dir.join("rounds.jsonl");
    again_args.extend(["--round-log", rounds_log.to_str().unwrap()]);
    again_args.extend(["--checkpoint", ckpt.to_str().unwrap(), "--save-model"]);
    again_args.push(model.to_str().unwrap());
    let mut again = Proc::spawn("resumed server", &again_args);
    // Its status shows the rounds going on from the checkpoint.
    let deadline = Instant::now() + common::HANG;
    let v = loop {
        match common::status(&addr, &[]) {
            Ok(v) if v["started"].as_bool() == Some(true) => break v,
            _ => assert!(
                Instant::now() < deadline,
                "no status:\n{}\n{}",
                again.log(),
                ws.iter().map(Proc::log).collect::<Vec<_>>().join("\n")
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["stats"]["resumed_at"].as_u64(), Some(at), "{v}");
    assert!(
        v["rounds"].as_u64() >= Some(at) && v["rounds"].as_u64() < Some(last),
        "{v}"
    );
    assert_eq!(v["connected"].as_array().map(Vec::len), Some(4), "{v}");
    assert_eq!(v["connected"][0]["transport"], "tcp", "{v}");
    for w in &mut ws {
        w.success();
        assert!(w.log().contains("reconnected 1 times"), "{}", w.log());
    }
    again.success();
    let log = again.log();
    assert!(log.contains(&format!("finished: {last} rounds")), "{log}");
    // Every round, before and after the crash, had all four workers: the closed form.
    common::assert_closed_form(&read_model(&model), 4, last as i32, 0.5);
    // Its rounds, logged, go on from the checkpoint's.
    let logged = common::parse_rounds(&std::fs::read_to_string(&rounds_log).unwrap());
    assert_eq!(
        logged.first().map(|r| r.round),
        Some(at),
        "{:?}",
        logged.first()
    );
    assert_eq!(logged.len() as u64, last - at);
    // And its checkpoint at the end is at the last round.
    assert_eq!(load(&ckpt, job, SHAPE).unwrap().rounds, vec![last]);
}
