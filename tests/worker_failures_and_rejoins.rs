//! Workers die, hang, come back, or start late; training goes on: a worker killed with SIGKILL
//! mid-round never stalls the timeout barrier and rejoins at the current round when restarted;
//! under naive and BSP the log names who everyone waits for, and --evict-after-ms drops a hung
//! worker so the rest go on; --start-after-ms starts without a worker that comes later.

mod common;

use std::time::{Duration, Instant};

use common::{summary_count, Proc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DIM: usize = 1000;

/// Waits until the server's log contains `text` (or fails after a generous bound).
fn wait_for(server: &Proc, text: &str) {
    let deadline = Instant::now() + common::HANG;
    while !server.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "never saw `{text}`:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn workers(addr: &str, ranks: std::ops::Range<u32>, extra: &[&str]) -> Vec<Proc> {
    ranks.map(|r| Proc::worker(addr, r, DIM, extra)).collect()
}

#[test]
fn a_killed_worker_never_stalls_the_timeout_barrier_and_rejoins_when_restarted() {
    let dir = common::scratch("killed");
    let log_file = dir.join("rounds.jsonl");
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "4",
        "--dim",
        "1000",
        "--policy",
        "timeout",
        "--timeout-ms",
        "20",
        "--rounds",
        "150",
        "--round-log",
        log_file.to_str().unwrap(),
    ]);
    let mut ws = workers(&addr, 0..3, &["--compute-ms", "5"]);
    let mut victim = Proc::worker(&addr, 3, DIM, &["--compute-ms", "5"]);
    wait_for(&server, "training starts");
    std::thread::sleep(Duration::from_millis(200));
    victim.child.kill().unwrap(); // SIGKILL, mid-round
    let _ = victim.wait();
    wait_for(&server, "worker 3 left");
    std::thread::sleep(Duration::from_millis(200));
    let mut again = Proc::worker(&addr, 3, DIM, &["--compute-ms", "5"]);
    for w in &mut ws {
        w.success();
    }
    again.success();
    server.success();
    let log = server.log();
    assert_eq!(log.matches("worker 3 joined").count(), 2, "{log}");
    assert!(log.contains("finished: 150 rounds"), "{log}");
    // Rounds went on without it while it was dead, and it took part again once back.
    let rounds = common::parse_rounds(&std::fs::read_to_string(&log_file).unwrap());
    let with = |r: &common::Round| r.participants.contains(&3);
    let gone = rounds
        .iter()
        .position(|r| !with(r))
        .expect("a round without it");
    let back = rounds[gone..]
        .iter()
        .position(with)
        .expect("a round with it again");
    assert!(
        rounds[gone + back..].iter().filter(|r| with(r)).count() > 10,
        "{rounds:?}"
    );
}

#[test]
fn a_hung_worker_is_named_then_evicted_under_naive_and_bsp() {
    for policy in ["naive", "bsp"] {
        let (mut server, addr) = Proc::server(&[
            "--workers",
            "4",
            "--dim",
            "1000",
            "--policy",
            policy,
            "--rounds",
            "60",
            "--evict-after-ms",
            "3000",
        ]);
        let mut ws = workers(&addr, 0..3, &["--compute-ms", "5"]);
        let mut hung = Proc::worker(&addr, 3, DIM, &["--compute-ms", "5"]);
        wait_for(&server, "training starts");
        std::thread::sleep(Duration::from_millis(100));
        // Its connection stays open: only the server's patience can end the wait.
        let pid = Pid::from_raw(hung.child.id() as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        wait_for(&server, "for worker(s) 3");
        wait_for(&server, "evicting worker 3");
        kill(pid, Signal::SIGCONT).unwrap();
        for w in &mut ws {
            w.success();
        }
        server.success();
        assert!(
            !hung.wait().success(),
            "{policy}: the evicted worker carried on"
        );
        assert!(hung.log().contains("evicted"), "{policy}: {}", hung.log());
        let log = server.log();
        assert_eq!(summary_count(&log, "evicted"), 1, "{policy}: {log}");
    }
}

#[test]
fn training_can_start_without_a_worker_that_comes_later() {
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "4",
        "--dim",
        "1000",
        "--policy",
        "naive",
        "--rounds",
        "80",
        "--start-after-ms",
        "300",
    ]);
    let mut ws = workers(&addr, 0..3, &["--compute-ms", "10"]);
    wait_for(&server, "training starts with 3 of 4 workers");
    let mut late = Proc::worker(&addr, 3, DIM, &["--compute-ms", "10"]);
    for w in &mut ws {
        w.success();
    }
    late.success();
    server.success();
    let log = server.log();
    assert!(log.contains("worker 3 joined (4/4 connected)"), "{log}");
    assert!(log.contains("finished: 80 rounds"), "{log}");
}
