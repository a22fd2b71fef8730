//! Hostile peers cost the server bounded resources and never lock real workers out: a thousand
//! connections that say nothing, a slowloris hello, malformed lengths and versions, a second
//! hello for a rank already held, a peer that pushes and never reads. Each runs beside a normal
//! job of 4 workers that must finish with the right model.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{max_abs_diff, parse_rounds, read_model, replay, scratch, Proc};
use hetsync::protocol::{control_frame, FrameKind, Header, Hello, HEADER_LEN};
use hetsync::worker::target;

const DIM: usize = 10_007;
const ROUNDS: i32 = 20;

/// A naive server for `workers` workers (4 real ones, ranks 0..4) saving its model.
fn server(name: &str, workers: u32, extra: &[&str]) -> (Proc, String, PathBuf) {
    let model = scratch(name).join("model.f32");
    let workers = workers.to_string();
    let rounds = ROUNDS.to_string();
    let mut args = vec![
        "--workers",
        &workers,
        "--dim",
        "10007",
        "--policy",
        "naive",
        "--lr",
        "0.5",
        "--rounds",
        &rounds,
        "--save-model",
        model.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (p, addr) = Proc::server(&args);
    (p, addr, model)
}

/// Runs the 4 real workers to the end.
fn run_workers(addr: &str, compute_ms: &str) {
    let mut ws: Vec<Proc> = (0..4)
        .map(|r| Proc::worker(addr, r, DIM, &["--compute-ms", compute_ms]))
        .collect();
    for w in &mut ws {
        w.success();
    }
}

/// The naive job's model after `ROUNDS` rounds with every one of 4 workers: its closed form.
fn assert_closed_form(model: &Path) {
    common::assert_closed_form(&read_model(model), 4, ROUNDS, 0.5);
}

fn hello_frame(rank: u32, workers: u32) -> Vec<u8> {
    let hello = Hello {
        rank,
        workers,
        dims: vec![DIM as u64],
        rdma: false,
        auth_nonce: None,
    };
    control_frame(FrameKind::Hello, 0, 0, &hello.encode())
}

/// Reads frames until the server's error frame; returns its text ("" if it just closed).
fn error_text(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(common::HANG)).unwrap();
    let mut h = [0u8; HEADER_LEN];
    loop {
        if s.read_exact(&mut h).is_err() {
            return String::new();
        }
        let h = Header::decode(&h).unwrap();
        let mut p = vec![0u8; h.len as usize];
        s.read_exact(&mut p).unwrap();
        if h.kind == FrameKind::Error {
            return String::from_utf8(p).unwrap();
        }
    }
}

fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
fn a_thousand_silent_connections_do_not_keep_workers_out() {
    raise_open_files();
    let (mut server, addr, model) = server("silent", 4, &[]);
    // They connect first and say nothing, ever.
    let silent: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    run_workers(&addr, "0");
    server.success();
    assert_closed_form(&model);
    let log = server.log();
    let dropped = log
        .lines()
        .filter(|l| l.contains("too many connections from this address without a handshake"))
        .count();
    // 64 may wait per address; every other silent connection was dropped, oldest first.
    assert!(
        dropped >= 1000 - 64,
        "{dropped} silent connections dropped:\n{log}"
    );
    drop(silent);
}

#[test]
fn a_slowloris_hello_is_dropped_at_the_handshake_deadline() {
    let (mut server, addr, model) = server("slowloris", 4, &["--handshake-timeout-ms", "1500"]);
    let mut slow = TcpStream::connect(&addr).unwrap();
    let started = Instant::now();
    let dribble = std::thread::spawn(move || {
        // One byte per 300 ms: a whole hello would take 30 s. Between bytes it listens, so it
        // reads the server's refusal before writing into a closed connection.
        slow.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for b in hello_frame(0, 4) {
            slow.write_all(&[b]).unwrap();
            let mut first = [0u8; 1];
            match slow.peek(&mut first) {
                Ok(_) => break,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("{e}"),
            }
        }
        error_text(&mut slow)
    });
    // The job outlasts the deadline (20 rounds of 100 ms).
    run_workers(&addr, "100");
    let why = dribble.join().unwrap();
    assert!(
        why.contains("no complete handshake within 1.5 s"),
        "{why:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it was not cut off"
    );
    server.success();
    assert_closed_form(&model);
}

#[test]
fn impossible_lengths_versions_and_sizes_are_refused_alone() {
    let (mut server, addr, model) = server("lengths", 4, &[]);
    let mut refusals = Vec::new();
    let mut send = |bytes: Vec<u8>| {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&bytes).unwrap();
        refusals.push(error_text(&mut s));
    };
    // A length prefix of 2^63 on a hello.
    send(
        Header::new(FrameKind::Hello, 0, 0, 1 << 63)
            .encode()
            .to_vec(),
    );
    // A wrong version.
    let mut v = hello_frame(1, 4);
    v[4] = 0xee;
    send(v);
    // A wrong magic.
    let mut m = hello_frame(1, 4);
    m[0] = b'X';
    send(m);
    // A push larger than the tensor, after a proper hello for a rank of a 4-worker job: that
    // rank is then free again for its real worker.
    let mut big = hello_frame(2, 4);
    big.extend_from_slice(&Header::new(FrameKind::Push, 0, 0, 4 * DIM as u64 + 4).encode());
    send(big);
    run_workers(&addr, "0");
    server.success();
    assert_closed_form(&model);
    let want = [
        "more than the limit",
        "protocol version",
        "bad magic",
        "negotiated tensor",
    ];
    for (got, want) in refusals.iter().zip(want) {
        assert!(got.contains(want), "expected `{want}` in {got:?}");
    }
}

#[test]
fn a_hello_for_a_rank_already_held_is_refused_without_naming_its_holder() {
    let (mut server, addr, model) = server("held", 4, &[]);
    let workers = std::thread::spawn({
        let addr = addr.clone();
        move || run_workers(&addr, "20")
    });
    // Worker 0 holds rank 0 once the job runs; a second hello for it must not reveal who.
    let deadline = Instant::now() + common::HANG;
    while !server.log().contains("training starts") {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let why = loop {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(&hello_frame(0, 4)).unwrap();
        let why = error_text(&mut s);
        if why.contains("already connected") {
            break why;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        !why.contains("127.0.0.1"),
        "the holder's address leaked: {why}"
    );
    workers.join().unwrap();
    server.success();
    assert_closed_form(&model);
}

#[test]
fn a_peer_that_pushes_and_never_reads_is_dropped_before_its_queue_grows() {
    // Rank 4 of 5 is hostile: it reads its welcome and its first model, then only pushes (its
    // late pushes are dropped), so the replies queue up in the server.
    let dir = scratch("unread");
    let log = dir.join("rounds.jsonl");
    let (mut server, addr, model) = server(
        "unread",
        5,
        &["--late", "drop", "--round-log", log.to_str().unwrap()],
    );
    let hostile = std::thread::spawn({
        let addr = addr.clone();
        move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(&hello_frame(4, 5)).unwrap();
            s.set_read_timeout(Some(common::HANG)).unwrap();
            for expect in [FrameKind::Welcome, FrameKind::Model] {
                let mut h = [0u8; HEADER_LEN];
                s.read_exact(&mut h).unwrap();
                let h = Header::decode(&h).unwrap();
                assert_eq!(h.kind, expect);
                std::io::copy(&mut (&mut s).take(h.len), &mut std::io::sink()).unwrap();
            }
            // Its gradient at the model of round 0 (zero), as a simulated worker's would be.
            let grad: Vec<u8> = target(4, 0, DIM, 1)
                .iter()
                .flat_map(|t| (-t).to_le_bytes())
                .collect();
            for _ in 0..200 {
                let head = Header::new(FrameKind::Push, 0, 0, grad.len() as u64).encode();
                if s.write_all(&head).and_then(|_| s.write_all(&grad)).is_err() {
                    return true; // dropped
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        }
    });
    run_workers(&addr, "5");
    assert!(
        hostile.join().unwrap(),
        "the peer that never reads was never dropped"
    );
    server.success();
    let text = server.log();
    assert!(text.contains("does not read its replies"), "{text}");
    // Its one on-time gradient (round 0) is in the model like any worker's; nothing else is.
    let rounds = parse_rounds(&std::fs::read_to_string(&log).unwrap());
    let off = max_abs_diff(&read_model(&model), &replay(&rounds, 5, DIM, 0.5));
    assert!(off < 1e-4, "off the replay by {off}");
}
