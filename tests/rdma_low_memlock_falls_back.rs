//! A locked-memory limit too low to register what RDMA needs, on a worker and on the server (in
//! CI: inside the Soft-RoCE guest, tests/guest/, where the processes drop to user `nobody`: root
//! is exempt from the limit). With `--transport auto` each carries on over TCP saying why; with
//! `--transport rdma` it stops with an error naming the limit and the fix; the job's other
//! workers are not held up. Outside the guest, with no RDMA device, it prints a SKIP line (and
//! fails where HETSYNC_REQUIRE_RDMA is set).
#![cfg(feature = "rdma")]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use common::Proc;

/// 100,000 floats: 400 KB per buffer, far above the limit below.
const DIM: usize = 100_000;
/// The limit the `nobody` processes run with.
const MEMLOCK: u64 = 64 * 1024;
const NOBODY: u32 = 65534;

/// Runs the command as `nobody` with a 64 KiB locked-memory limit.
fn low_memlock(cmd: &mut Command) {
    cmd.uid(NOBODY).gid(NOBODY);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            setrlimit(Resource::RLIMIT_MEMLOCK, MEMLOCK, MEMLOCK).map_err(std::io::Error::from)
        });
    }
}

/// Lets `nobody` open the RDMA device (root only, by default, in the guest).
fn open_the_device_to_all() {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir("/dev/infiniband").expect("/dev/infiniband") {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap_or_else(
            |e| {
                panic!(
                    "chmod {}: {e} (the guest runs the tests as root)",
                    path.display()
                )
            },
        );
    }
}

#[test]
fn a_low_memlock_limit_falls_back_to_tcp_or_stops_clearly() {
    if !common::rdma_here() {
        return;
    }
    open_the_device_to_all();
    let dim = DIM.to_string();
    let job = [
        "--workers",
        "3",
        "--dim",
        &dim,
        "--rounds",
        "10",
        "--transport",
        "rdma",
    ];

    // A worker that cannot register its buffers, with --transport auto: TCP, saying why; the
    // job (its other workers over RDMA) finishes.
    let (mut server, addr) = Proc::server(&job);
    let mut workers: Vec<Proc> = (0..2)
        .map(|r| Proc::worker(&addr, r, DIM, &["--transport", "rdma"]))
        .collect();
    let worker_args = ["worker", "--server", &addr, "--rank", "2", "--dim", &dim];
    let auto = [&worker_args[..], &["--transport", "auto"]].concat();
    workers.push(Proc::spawn_with("worker 2 (nobody)", &auto, low_memlock));
    for w in &mut workers {
        w.success();
    }
    server.success();
    let log = workers[2].log();
    assert!(
        log.contains("transport tcp, because this worker could not set up RDMA"),
        "{log}"
    );
    assert!(log.contains("locked-memory limit"), "{log}");
    assert!(
        workers[0].log().contains("transport rdma"),
        "{}",
        workers[0].log()
    );
    let slog = server.log();
    assert!(slog.contains("finished: 10 rounds"), "{slog}");
    assert!(slog.contains("could not set up RDMA on its side"), "{slog}");

    // The same worker with --transport rdma stops, naming the limit; the server is not harmed
    // (it goes on waiting for a worker 0 that can).
    let (_server, addr) = Proc::server(&["--workers", "1", "--dim", &dim, "--transport", "rdma"]);
    let worker_args = ["worker", "--server", &addr, "--rank", "0", "--dim", &dim];
    let rdma = [&worker_args[..], &["--transport", "rdma"]].concat();
    let mut w = Proc::spawn_with("worker 0 (nobody)", &rdma, low_memlock);
    assert!(!w.wait().success(), "{}", w.log());
    assert!(w.log().contains("locked-memory limit"), "{}", w.log());

    // A server that cannot register its arena: TCP with auto, saying why; an error with rdma.
    let serve = |transport: &str| {
        let args = [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--dim",
            &dim,
            "--transport",
            transport,
            "--rounds",
            "1",
        ];
        Proc::spawn_with(
            &format!("server --transport {transport} (nobody)"),
            &args,
            low_memlock,
        )
    };
    let mut strict = serve("rdma");
    assert!(!strict.wait().success(), "{}", strict.log());
    assert!(
        strict.log().contains("locked-memory limit"),
        "{}",
        strict.log()
    );
    let auto = serve("auto");
    let deadline = std::time::Instant::now() + common::HANG;
    while !auto.log().contains("listening on") {
        assert!(std::time::Instant::now() < deadline, "{}", auto.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        auto.log().contains("transport tcp, because"),
        "{}",
        auto.log()
    );
    assert!(auto.log().contains("locked-memory limit"), "{}", auto.log());
}
