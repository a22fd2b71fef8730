//! `cluster-scripts/hetsync.sbatch` submitted for real to a three-node Slurm that this test starts
//! (munge, slurmctld, slurmd n1..n3 on this host; tests/slurm/local-slurm.sh) and stops again.
//! Needs root and the Slurm packages (`.ci/install-deps.sh --tests`); in CI it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{max_abs_diff, read_model, scratch};
use hetsync::worker::mean_target;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The local Slurm; stopped (every daemon, by PID) when dropped, whatever the test did.
struct LocalSlurm {
    dir: PathBuf,
    conf: String,
}

impl LocalSlurm {
    fn start(dir: &Path) -> LocalSlurm {
        let out = Command::new("bash")
            .arg(root().join("tests/slurm/local-slurm.sh"))
            .args(["start", dir.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stderr}");
        let slurm = LocalSlurm {
            dir: dir.to_path_buf(),
            conf: stdout
                .trim()
                .strip_prefix("export SLURM_CONF=")
                .unwrap_or_default()
                .to_string(),
        };
        assert!(
            out.status.success() && !slurm.conf.is_empty(),
            "Slurm did not start:\n{stderr}"
        );
        slurm
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf)
            .env("HETSYNC", common::bin());
        c
    }

    /// Submits the script; returns the job id.
    fn sbatch(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let out_pattern = self.dir.join("job-%j.out");
        let mut c = self.cmd("sbatch");
        c.envs(env.iter().copied())
            .args(["--parsable", "--output", out_pattern.to_str().unwrap()])
            .args(args);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "sbatch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Waits for the job to leave the queue; returns its final state and its output.
    fn wait(&self, id: &str) -> (String, String) {
        let deadline = Instant::now() + common::HANG;
        loop {
            let q = self.cmd("squeue").args(["-h", "-j", id]).output().unwrap();
            if q.stdout.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still queued or running after {:?}",
                common::HANG
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let show = self
            .cmd("scontrol")
            .args(["show", "job", id, "-o"])
            .output()
            .unwrap();
        let show = String::from_utf8_lossy(&show.stdout).into_owned();
        let state = show
            .split_whitespace()
            .find_map(|f| f.strip_prefix("JobState="))
            .unwrap_or("unknown")
            .to_string();
        let out =
            std::fs::read_to_string(self.dir.join(format!("job-{id}.out"))).unwrap_or_default();
        (state, out)
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("tests/slurm/local-slurm.sh"))
            .args(["stop", self.dir.to_str().unwrap()])
            .status();
    }
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

#[test]
fn hetsync_sbatch_runs_on_a_real_three_node_slurm() {
    let is_root = nix::unistd::Uid::effective().is_root();
    let has_slurm = Command::new("slurmctld").arg("-V").output().is_ok();
    if !(is_root && has_slurm) {
        let why = "needs root and the Slurm packages (sudo bash .ci/install-deps.sh --tests)";
        assert!(
            std::env::var_os("CI").is_none(),
            "the Slurm test cannot run in CI: it {why}"
        );
        eprintln!("skipping the real-Slurm test: it {why}");
        return;
    }
    let dir = scratch("slurm");
    let slurm = LocalSlurm::start(&dir);

    // A job that trains: 2 workers on n2 and n3, every worker in every round (naive), so the
    // model has a closed form.
    let model = dir.join("model.f32");
    let port = free_port();
    let id = slurm.sbatch(
        &[("HETSYNC_PORT", &port)],
        &[
            "-N",
            "3",
            "--time",
            "5",
            root()
                .join("cluster-scripts/hetsync.sbatch")
                .to_str()
                .unwrap(),
            "--dims",
            "1000,3000",
            "--partition-kib",
            "4",
            "--policy",
            "naive",
            "--lr",
            "0.5",
            "--rounds",
            "20",
            "--compute-ms",
            "1",
            "--save-model",
            model.to_str().unwrap(),
        ],
    );
    let (state, out) = slurm.wait(&id);
    eprintln!("--- job {id}: {state}\n{out}");
    assert_eq!(state, "COMPLETED", "{out}");
    for line in [
        "server starting on n1",
        "worker 0 starting on n2",
        "worker 1 starting on n3",
    ] {
        assert!(out.contains(line), "missing `{line}`:\n{out}");
    }
    assert!(out.contains("transport: tcp"), "{out}");
    assert!(out.contains("finished: 20 rounds"), "{out}");
    assert!(out.contains("hetsync.sbatch: done"), "{out}");
    // The job made its own secret, the workers proved they knew it, and it is gone now.
    assert!(out.contains("workers must know the job's secret"), "{out}");
    let secret = out
        .lines()
        .find_map(|l| l.split("job's secret in ").nth(1))
        .unwrap_or_else(|| panic!("no per-job secret:\n{out}"));
    assert!(
        !std::path::Path::new(secret.trim()).exists(),
        "{secret} left behind"
    );
    // Two tensors, the second in three parts: each key reaches its closed form.
    let got = read_model(&model);
    assert_eq!(got.len(), 4000, "both tensors, in key order");
    let mut at = 0;
    for (key, dim) in [(0, 1000), (1, 3000)] {
        let mean = mean_target(2, key, dim, 1);
        let closed: Vec<f32> = mean.iter().map(|m| m * (1.0 - 0.5f32.powi(20))).collect();
        let diff = max_abs_diff(&got[at..at + dim], &closed);
        assert!(diff < 1e-5, "key {key} is off the closed form by {diff}");
        at += dim;
    }

    // A job whose workers cannot reach the server: it must fail, within its time limit, and say why.
    let started = Instant::now();
    let id = slurm.sbatch(
        &[
            ("HETSYNC_SERVER_ADDR", "127.0.0.1:1"),
            ("HETSYNC_PORT", &free_port()),
        ],
        &[
            "-N",
            "3",
            "--time",
            "2",
            root()
                .join("cluster-scripts/hetsync.sbatch")
                .to_str()
                .unwrap(),
            "--dim",
            "100",
            "--rounds",
            "5",
            "--connect-timeout",
            "3",
        ],
    );
    let (state, out) = slurm.wait(&id);
    eprintln!("--- job {id}: {state} after {:?}\n{out}", started.elapsed());
    assert_eq!(state, "FAILED", "{out}");
    assert!(
        out.contains("cannot connect to server 127.0.0.1:1"),
        "{out}"
    );
    assert!(out.contains("worker 0 failed"), "{out}");
    assert!(out.contains("hetsync.sbatch: FAILED"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the failing job ran past its time limit"
    );
}
