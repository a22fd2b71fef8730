//! End to end over loopback, Angel's sync controller: with SSP a slow worker lets the fast ones
//! run ahead by exactly the staleness and no further (read from `--trace`); BSP, every push
//! applied as it arrives, reaches the naive barrier's closed form; ASP never holds a read.

mod common;

use common::{job, max_abs_diff, read_model, scratch};
use hetsync::worker::mean_target;

/// The `pull_served` events of a trace: (worker, clock, min_clock).
fn reads(trace: &str) -> Vec<(u64, u64, u64)> {
    trace
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "pull_served")
        .map(|v| {
            (
                v["worker"].as_u64().unwrap(),
                v["clock"].as_u64().unwrap(),
                v["min_clock"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Runs 4 workers (2 ms of compute; the last with `slow` too) under `policy` until the slowest
/// has completed `rounds` clocks; returns the trace, the final model and the server's log.
fn run(
    policy: &[&str],
    dim: usize,
    rounds: u32,
    slow: &[&str],
    name: &str,
) -> (String, Vec<f32>, String) {
    let dir = scratch(name);
    let (trace, model) = (dir.join("trace.jsonl"), dir.join("model.f32"));
    let (rounds, dim_s) = (rounds.to_string(), dim.to_string());
    let mut server = vec![
        "--lr",
        "0.5",
        "--rounds",
        &rounds,
        "--trace",
        trace.to_str().unwrap(),
    ];
    server.extend_from_slice(policy);
    let fast: &[&str] = &["--compute-ms", "2", "--workers", "4"];
    let slow = [fast, slow].concat();
    let log = job(
        &["--dim", &dim_s],
        &server,
        &[fast, fast, fast, &slow],
        &model,
    );
    (
        std::fs::read_to_string(&trace).unwrap(),
        read_model(&model),
        log,
    )
}

#[test]
fn ssp_lets_fast_workers_run_exactly_n_clocks_ahead_of_a_slow_one() {
    let (trace, model, log) = run(
        &["--policy", "ssp", "--staleness", "3"],
        1000,
        12,
        &["--straggle-ms", "60"],
        "ssp",
    );
    let reads = reads(&trace);
    assert!(!reads.is_empty(), "no pull_served in the trace:\n{log}");
    for &(w, clock, min) in &reads {
        assert!(
            clock <= min + 3,
            "worker {w} read at {clock} with the slowest at {min}"
        );
    }
    let ahead = reads.iter().map(|&(_, c, m)| c - m).max().unwrap();
    assert_eq!(ahead, 3, "the fast workers never reached the bound:\n{log}");
    // Every push was applied as it came, and the slow worker kept clocking.
    let applied = trace
        .lines()
        .filter(|l| l.contains("\"push_applied\""))
        .count();
    assert!(applied >= 4 * 12, "{applied} pushes applied");
    let slowest = reads
        .iter()
        .filter(|r| r.0 == 3)
        .map(|r| r.1)
        .max()
        .unwrap();
    assert!(slowest >= 12, "the slow worker reached clock {slowest}");
    assert!(model.iter().all(|m| m.is_finite()));
    assert!(
        log.contains("policy ssp (vector clock, staleness 3)"),
        "{log}"
    );
}

#[test]
fn bsp_applies_every_push_as_it_comes_and_reaches_the_naive_closed_form() {
    let (dim, rounds, lr) = (10_007usize, 20u32, 0.5f32);
    let (trace, got, log) = run(
        &["--policy", "bsp"],
        dim,
        rounds,
        &["--straggle-ms", "15"],
        "bsp",
    );
    let reads = reads(&trace);
    assert!(
        reads.iter().all(|&(_, c, m)| c == m),
        "a BSP read ran ahead"
    );
    let mean = mean_target(4, 0, dim, 1);
    let decay = 1.0 - (1.0 - lr).powi(rounds as i32);
    let closed: Vec<f32> = mean.iter().map(|m| m * decay).collect();
    assert!(
        max_abs_diff(&got, &closed) < 1e-5,
        "off the closed form by {}:\n{log}",
        max_abs_diff(&got, &closed)
    );
    assert!(log.contains("finished: slowest clock 20"), "{log}");
}

#[test]
fn asp_never_holds_a_read_back() {
    let (trace, _, log) = run(
        &["--policy", "asp"],
        1000,
        5,
        &["--straggle-ms", "100"],
        "asp",
    );
    let reads = reads(&trace);
    let ahead = reads.iter().map(|&(_, c, m)| c - m).max().unwrap();
    // In the time the slow worker takes 5 steps of 100 ms, fast ones take far more than 5.
    assert!(
        ahead > 10,
        "fast workers ran only {ahead} clocks ahead:\n{log}"
    );
}

/// A worker's clock on a key ticks only in iterations that pushed it: a worker that leaves a key
/// out now and then is not dropped for it, and holds only that key's slowest clock back.
#[test]
fn a_key_left_out_of_an_iteration_keeps_its_clock() {
    use hetsync::client::{Client, ConnectOptions, Status};
    use hetsync::server::{Server, ServerConfig};
    use hetsync::sync::SyncMode;
    use std::sync::atomic::AtomicBool;

    let dims = vec![10, 3];
    let (server, _) = Server::bind(ServerConfig {
        mode: SyncMode::Clocks(None),
        rounds: Some(4),
        transport: hetsync_transport::any::Choice::Tcp,
        ..ServerConfig::new("127.0.0.1:0".parse().unwrap(), 2, dims.clone())
    })
    .unwrap();
    let addr = server.local_addr().to_string();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| server.run(&stop));
        let workers: Vec<_> = (0..2u32)
            .map(|rank| {
                let opts = ConnectOptions::new(&addr, rank, dims.clone());
                s.spawn(move || {
                    let mut c = Client::connect(&opts).unwrap();
                    assert_eq!(c.wait_all().unwrap(), Status::Ready);
                    for i in 0..200 {
                        // Worker 1 pushes key 1 every other iteration only.
                        let keys: &[usize] = if rank == 1 && i % 2 == 1 {
                            &[0]
                        } else {
                            &[0, 1]
                        };
                        for &k in keys {
                            c.tensor(k).1.fill(1.0);
                            c.push(k).unwrap();
                        }
                        c.clock();
                        if c.wait_all().unwrap() == Status::Shutdown {
                            return i;
                        }
                    }
                    panic!("the server never finished");
                })
            })
            .collect();
        let iterations: Vec<u32> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let report = server.join().unwrap().unwrap();
        assert_eq!(report.stats.departures, 0, "a worker was dropped");
        assert_eq!(
            report.stats.rounds, 4,
            "key 1's slowest clock sets the pace"
        );
        // Worker 1 took about 8 iterations to push key 1 four times.
        assert!(iterations[1] >= 6, "{iterations:?}");
    });
}
