//! SIGTERM (what `scancel --signal=TERM` sends) ends the server with exit 0 after it says goodbye
//! to every worker, and the workers exit 0 too.

mod common;

use std::time::Duration;

use common::{scratch, Proc};

#[test]
fn sigterm_says_goodbye_to_workers_and_exits_zero() {
    let dir = scratch("sigterm");
    let model = dir.join("model.f32");
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "2",
        "--dim",
        "100",
        "--save-model",
        model.to_str().unwrap(),
    ]);
    let mut ws: Vec<Proc> = (0..2)
        .map(|r| Proc::worker(&addr, r, 100, &["--compute-ms", "1"]))
        .collect();
    // Let some rounds run, then stop the server as Slurm would.
    let deadline = std::time::Instant::now() + common::HANG;
    while !server.log().contains("training starts") {
        assert!(
            std::time::Instant::now() < deadline,
            "training never started:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    server.success();
    for w in &mut ws {
        w.success();
        assert!(w.log().contains("the server ended the run"), "{}", w.log());
    }
    assert!(server.log().contains("finished:"), "{}", server.log());
    assert_eq!(
        std::fs::metadata(&model).unwrap().len(),
        400,
        "the model was saved"
    );
}
