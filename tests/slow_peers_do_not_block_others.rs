//! A peer that sends in dribbles and a peer that does not read hold nobody up, and the model a
//! slow reader finally receives is whole: exactly the version it was stamped with, even though the
//! server updated the model many times while the send sat in its queue.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{max_abs_diff, parse_rounds, read_frame, replay, scratch, summary_count, Proc};
use hetsync::protocol::{control_frame, FrameKind, Header, Hello};

const DIM: usize = 1 << 22;

#[test]
fn dribbling_and_non_reading_peers_do_not_stall_training_or_tear_models() {
    let dir = scratch("slow");
    let rounds_log = dir.join("rounds.jsonl");
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "3",
        "--dim",
        &DIM.to_string(),
        // One part: this hand-driven peer speaks in whole tensors.
        "--partition-kib",
        "16384",
        "--policy",
        "timeout",
        "--timeout-ms",
        "20",
        "--lr",
        "0.5",
        "--rounds",
        "25",
        "--round-log",
        rounds_log.to_str().unwrap(),
    ]);

    // The slow peer, rank 2. Its 16 MiB model outgrows the kernel buffers, so the reply really
    // queues in the server while the model changes.
    let mut slow = TcpStream::connect(&addr).unwrap();
    socket2::SockRef::from(&slow)
        .set_recv_buffer_size(256 * 1024)
        .unwrap();
    slow.set_read_timeout(Some(common::HANG)).unwrap();
    let hello = Hello {
        rank: 2,
        workers: 3,
        dims: vec![DIM as u64],
        rdma: false,
        auth_nonce: None,
    };
    slow.write_all(&control_frame(FrameKind::Hello, 0, 0, &hello.encode()))
        .unwrap();

    let mut fast: Vec<Proc> = (0..2)
        .map(|r| Proc::worker(&addr, r, DIM, &["--compute-ms", "1"]))
        .collect();
    assert_eq!(read_frame(&mut slow).0.kind, FrameKind::Welcome);
    let (h, _) = read_frame(&mut slow);
    assert_eq!((h.kind, h.clock), (FrameKind::Model, 0));

    // Its push is for round 0: make sure that round has closed (on a loaded machine the fast
    // workers' 16 MiB pushes can take longer than this one), so the push is late.
    let deadline = std::time::Instant::now() + common::HANG;
    while common::status(&addr, &[]).map_or(0, |v| v["rounds"].as_u64().unwrap_or(0)) < 1 {
        assert!(std::time::Instant::now() < deadline, "no rounds closed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A push whose header arrives a byte at a time and whose payload arrives in pieces.
    let grad: Vec<u8> = vec![0u8; DIM * 4];
    for b in Header::new(FrameKind::Push, 0, 0, grad.len() as u64).encode() {
        slow.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    for chunk in grad.chunks(1 << 20) {
        slow.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now do not read the reply at all until the others have finished training: they exit on the
    // server's goodbye after the last round, so every round closed while this reply sat unread.
    for w in &mut fast {
        w.success();
    }
    let (h, payload) = read_frame(&mut slow);
    assert_eq!(h.kind, FrameKind::Model);
    let got: Vec<f32> = payload
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // The queued reply was still delivered whole during the server's shutdown, then its goodbye.
    assert_eq!(read_frame(&mut slow).0.kind, FrameKind::Bye);
    drop(slow);
    server.success();
    let log = std::fs::read_to_string(&rounds_log).unwrap();
    assert_eq!(
        log.lines().count(),
        25,
        "training went on without the slow peer"
    );
    assert!(
        h.clock > 0,
        "the slow peer's late push was answered with the current model"
    );
    let rounds = parse_rounds(&log);
    let want = replay(&rounds[..h.clock as usize], 3, DIM, 0.5);
    let diff = max_abs_diff(&got, &want);
    assert!(
        diff < 1e-4,
        "the slow peer's model (round {}) is torn or wrong: off by {diff}",
        h.clock
    );
    // The slow peer's push was for round 0, long closed when it arrived: folded in as late.
    let slog = server.log();
    assert!(summary_count(&slog, "folded") >= 1, "{slog}");
}
