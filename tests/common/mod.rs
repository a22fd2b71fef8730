//! Helpers for the end-to-end tests: run the real `hetsync` binary on loopback, with a hang guard.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A generous bound that only catches hangs; tests never assert timings.
pub const HANG: Duration = Duration::from_secs(120);

/// The `hetsync` binary: cargo's, or `HETSYNC_BIN` where the tests run elsewhere (the guest).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("HETSYNC_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hetsync").into())
    })
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hetsync-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running process whose stderr is collected line by line.
pub struct Proc {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Proc {
    pub fn spawn(what: &str, args: &[&str]) -> Proc {
        Proc::spawn_with(what, args, |_| {})
    }

    /// Like [`spawn`](Self::spawn), with `setup` applied to the command first (a user id,
    /// resource limits).
    pub fn spawn_with(what: &str, args: &[&str], setup: impl FnOnce(&mut Command)) -> Proc {
        let mut cmd = Command::new(bin());
        setup(&mut cmd);
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            log,
            lines,
            what: what.to_string(),
        }
    }

    /// Starts `hetsync server` on a free loopback port and returns it with its address.
    pub fn server(args: &[&str]) -> (Proc, String) {
        let mut all = vec!["server", "--listen", "127.0.0.1:0", "--progress", "0"];
        all.extend_from_slice(args);
        let mut p = Proc::spawn("server", &all);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match p.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap().to_string();
                        return (p, addr);
                    }
                }
                Err(_) => {
                    let _ = p.child.kill();
                    panic!("server never said where it listens:\n{}", p.log());
                }
            }
        }
    }

    pub fn worker(addr: &str, rank: u32, dim: usize, extra: &[&str]) -> Proc {
        let (rank, dim) = (rank.to_string(), dim.to_string());
        let mut all = vec!["worker", "--server", addr, "--rank", &rank, "--dim", &dim];
        all.extend_from_slice(extra);
        Proc::spawn(&format!("worker {rank}"), &all)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits for exit, killing the process (and failing) if it hangs.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + HANG;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread collect the last lines.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} hung; its log:\n{}", self.what, self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits and asserts success.
    pub fn success(&mut self) {
        let status = self.wait();
        assert!(
            status.success(),
            "{} failed ({status}):\n{}",
            self.what,
            self.log()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never leave a process behind, whatever the test did.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a job of 4 workers on loopback: the server with `--workers 4 --save-model save`, the
/// tensors `model` (`--dims ...`) and `server_extra`; worker `r` with `worker_extra[r]`. Waits
/// for everyone to succeed and returns the server's log.
pub fn job(
    model: &[&str],
    server_extra: &[&str],
    worker_extra: &[&[&str]; 4],
    save: &Path,
) -> String {
    let mut args = vec!["--workers", "4", "--save-model", save.to_str().unwrap()];
    args.extend_from_slice(model);
    args.extend_from_slice(server_extra);
    let (mut server, addr) = Proc::server(&args);
    let mut ws: Vec<Proc> = (0..4)
        .map(|r| {
            let rank = r.to_string();
            let mut a = vec!["worker", "--server", &addr, "--rank", &rank];
            a.extend_from_slice(model);
            a.extend_from_slice(worker_extra[r]);
            Proc::spawn(&format!("worker {r}"), &a)
        })
        .collect();
    server.success();
    for w in &mut ws {
        w.success();
    }
    server.log()
}

/// Runs `hetsync status --server addr --json` with `extra` options; returns its report, or
/// its error text when it fails.
pub fn status(addr: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(bin())
        .args(["status", "--server", addr, "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Reads a model saved with `--save-model`.
pub fn read_model(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Asserts that `got` is the naive barrier's model after `rounds` rounds of `workers` workers
/// (every one in every round) at rate `lr` from zero: `mean target * (1 - (1 - lr)^rounds)`.
pub fn assert_closed_form(got: &[f32], workers: u32, rounds: i32, lr: f32) {
    let decay = 1.0 - (1.0 - lr).powi(rounds);
    let want: Vec<f32> = hetsync::worker::mean_target(workers, 0, got.len(), 1)
        .iter()
        .map(|m| m * decay)
        .collect();
    let off = max_abs_diff(got, &want);
    assert!(off < 1e-5, "off the closed form by {off}");
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// One line of a server's `--round-log`: one round of one key.
#[derive(Debug)]
pub struct Round {
    pub key: usize,
    pub round: u64,
    pub participants: Vec<usize>,
    /// Workers in some parts of the key only: (rank, part indices within the key).
    pub partial: Vec<(usize, Vec<usize>)>,
    /// Late gradients folded into this round: (worker, round computed on, weight, the parts
    /// it went into, empty for all).
    pub late: Vec<(usize, u64, f64, Vec<usize>)>,
    pub cause: String,
}

pub fn parse_rounds(log: &str) -> Vec<Round> {
    let ranks = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect()
    };
    log.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["event"], "round_closed", "{line}");
            let late: Vec<(usize, u64, f64, Vec<usize>)> = v["late"]
                .as_array()
                .map(|ls| {
                    ls.iter()
                        .map(|l| {
                            (
                                l["worker"].as_u64().unwrap() as usize,
                                l["clock"].as_u64().unwrap(),
                                l["weight"].as_f64().unwrap(),
                                l.get("parts").map(&ranks).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(v["folded"].as_u64(), Some(late.len() as u64), "{line}");
            Round {
                late,
                key: v["key"].as_u64().unwrap() as usize,
                round: v["round"].as_u64().unwrap(),
                participants: ranks(&v["participants"]),
                partial: v["partial"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| (p[0].as_u64().unwrap() as usize, ranks(&p[1])))
                            .collect()
                    })
                    .unwrap_or_default(),
                cause: v["cause"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

/// Key `key`'s model after its logged rounds, replayed in f64 from zero with the simulated
/// workers' objective: `m <- m - lr * mean over participants p of (m - target_p)`, where element
/// `i` (in part `i / part_floats`) counts a worker listed as partial only for its parts, and a
/// late gradient folded in with weight `w` counts `w` times, computed on the model of its round.
pub fn replay_key(
    rounds: &[Round],
    workers: u32,
    key: usize,
    dim: usize,
    part_floats: usize,
    lr: f64,
) -> Vec<f32> {
    let targets: Vec<Vec<f32>> = (0..workers)
        .map(|r| hetsync::worker::target(r, key, dim, 1))
        .collect();
    let mut m = vec![0f64; dim];
    // The models late gradients were computed on, kept only for those rounds.
    let needed: std::collections::BTreeSet<u64> = rounds
        .iter()
        .filter(|r| r.key == key)
        .flat_map(|r| r.late.iter().map(|l| l.1))
        .collect();
    let mut history: std::collections::HashMap<u64, Vec<f64>> = Default::default();
    for r in rounds.iter().filter(|r| r.key == key) {
        if needed.contains(&r.round) {
            history.insert(r.round, m.clone());
        }
        let late: Vec<(&Vec<f64>, usize, f64, &Vec<usize>)> = r
            .late
            .iter()
            .map(|(w, c, wt, parts)| (&history[c], *w, *wt, parts))
            .collect();
        for (i, mi) in m.iter_mut().enumerate() {
            let part = i / part_floats;
            let extra = r
                .partial
                .iter()
                .filter(|(_, parts)| parts.contains(&part))
                .map(|(w, _)| *w);
            let who: Vec<usize> = r.participants.iter().copied().chain(extra).collect();
            let on_time: f64 = who.iter().map(|&p| *mi - f64::from(targets[p][i])).sum();
            let here: Vec<_> = late
                .iter()
                .filter(|l| l.3.is_empty() || l.3.contains(&part))
                .collect();
            let folded: f64 = here
                .iter()
                .map(|&&(old, w, wt, _)| wt * (old[i] - f64::from(targets[w][i])))
                .sum();
            let weight = match here.len() {
                0 => who.len() as f64,
                _ => (who.len() as f64 + here.iter().map(|l| l.2).sum::<f64>()).max(1.0),
            };
            *mi -= lr * (on_time + folded) / weight;
        }
    }
    m.iter().map(|&x| x as f32).collect()
}

/// The one-tensor case of [`replay_key`], with no partial rounds.
pub fn replay(rounds: &[Round], workers: u32, dim: usize, lr: f64) -> Vec<f32> {
    replay_key(rounds, workers, 0, dim, usize::MAX, lr)
}

/// The number after `word` in the server's `finished:` line, e.g. `folded 3`.
pub fn summary_count(log: &str, word: &str) -> u64 {
    log.lines()
        .find(|l| l.contains("finished:"))
        .and_then(|l| l.split(&format!(" {word} ")).nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| {
            n.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `{word}` count in the summary:\n{log}"))
}

/// Reads one whole frame (header and payload) from a raw protocol connection.
pub fn read_frame(s: &mut std::net::TcpStream) -> (hetsync::protocol::Header, Vec<u8>) {
    use std::io::Read;
    let mut h = [0u8; hetsync::protocol::HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = hetsync::protocol::Header::decode(&h).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    (h, p)
}

/// Whether this host has an RDMA device. Without one it prints a SKIP line, or fails where
/// HETSYNC_REQUIRE_RDMA is set (inside the Soft-RoCE guest, where one must be).
#[cfg(feature = "rdma")]
pub fn rdma_here() -> bool {
    match hetsync_transport::rdma::verbs::device_names() {
        Ok(_) => true,
        Err(e) if std::env::var_os("HETSYNC_REQUIRE_RDMA").is_none() => {
            eprintln!(
                "SKIP: no RDMA device on this host ({e}); the real run is in the Soft-RoCE guest"
            );
            false
        }
        Err(e) => panic!("no RDMA device in the guest: {e}"),
    }
}
