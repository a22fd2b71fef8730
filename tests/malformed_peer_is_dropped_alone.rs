//! A malformed or misbehaving connection is refused or dropped with a message saying why, and the
//! server keeps serving everyone else without losing a round.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::Proc;
use hetsync::protocol::{control_frame, FrameKind, Header, Hello, HEADER_LEN};

/// A hand-driven protocol peer.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(common::HANG)).unwrap();
        Raw(s)
    }

    fn hello(addr: &str, rank: u32, workers: u32, dim: u64) -> Raw {
        let mut raw = Raw::connect(addr);
        let hello = Hello {
            rank,
            workers,
            dims: vec![dim],
            rdma: false,
            auth_nonce: None,
        };
        raw.send(&control_frame(FrameKind::Hello, 0, 0, &hello.encode()));
        let h = raw.header();
        assert_eq!(h.kind, FrameKind::Welcome);
        raw.payload(&h);
        raw
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn header(&mut self) -> Header {
        let mut b = [0u8; HEADER_LEN];
        self.0.read_exact(&mut b).unwrap();
        Header::decode(&b).unwrap()
    }

    fn payload(&mut self, h: &Header) -> Vec<u8> {
        let mut v = vec![0u8; h.len as usize];
        self.0.read_exact(&mut v).unwrap();
        v
    }

    /// Expects an error frame, returns its text, and then the end of the connection.
    fn error_then_eof(&mut self) -> String {
        let h = self.header();
        assert_eq!(
            h.kind,
            FrameKind::Error,
            "expected an error frame, got {h:?}"
        );
        let text = String::from_utf8(self.payload(&h)).unwrap();
        let mut rest = Vec::new();
        let _ = self.0.read_to_end(&mut rest);
        assert!(rest.is_empty(), "data after the error frame");
        text
    }

    fn model(&mut self) -> (u64, Vec<f32>) {
        let h = self.header();
        assert_eq!(h.kind, FrameKind::Model, "expected a model, got {h:?}");
        let p = self.payload(&h);
        (
            h.clock,
            p.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }

    fn push(&mut self, clock: u64, grad: &[f32]) {
        let body: Vec<u8> = grad.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.send(&Header::new(FrameKind::Push, 0, clock, body.len() as u64).encode());
        self.send(&body);
    }
}

#[test]
fn a_malformed_frame_drops_only_that_worker() {
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "2",
        "--dim",
        "64",
        "--policy",
        "timeout",
        "--timeout-ms",
        "20",
        "--rounds",
        "15",
    ]);
    let mut good = Proc::worker(&addr, 0, 64, &["--compute-ms", "2"]);
    let mut bad = Raw::hello(&addr, 1, 2, 64);
    let (round, model) = bad.model();
    assert_eq!((round, model.len()), (0, 64));
    // A push header declaring more bytes than the negotiated tensor.
    bad.send(&Header::new(FrameKind::Push, 0, 0, 300).encode());
    let why = bad.error_then_eof();
    assert!(
        why.contains("300 bytes") && why.contains("256 bytes"),
        "{why}"
    );

    server.success();
    good.success();
    let log = server.log();
    assert!(log.contains("worker 1 left: protocol violation"), "{log}");
    assert!(log.contains("finished: 15 rounds"), "{log}");
}

#[test]
fn garbage_wrong_sizes_and_bad_ranks_are_refused_with_a_reason() {
    let (mut server, addr) = Proc::server(&["--workers", "1", "--dim", "32", "--rounds", "10"]);

    let mut garbage = Raw::connect(&addr);
    garbage.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n......");
    assert!(garbage.error_then_eof().contains("bad magic"));

    let mut truncated = Raw::connect(&addr);
    truncated.send(&Header::new(FrameKind::Hello, 0, 0, 20).encode()[..10]);
    drop(truncated);

    let mut early = Raw::connect(&addr);
    early.send(&Header::new(FrameKind::Push, 0, 0, 128).encode());
    assert!(early.error_then_eof().contains("before the handshake"));

    let mut wrong_dim = Proc::worker(&addr, 0, 33, &[]);
    assert!(!wrong_dim.wait().success());
    assert!(
        wrong_dim.log().contains("tensor size mismatch"),
        "{}",
        wrong_dim.log()
    );

    let mut wrong_rank = Proc::worker(&addr, 5, 32, &[]);
    assert!(!wrong_rank.wait().success());
    assert!(
        wrong_rank.log().contains("out of range"),
        "{}",
        wrong_rank.log()
    );

    let mut wrong_job = Proc::worker(&addr, 0, 32, &["--workers", "3"]);
    assert!(!wrong_job.wait().success());
    assert!(
        wrong_job.log().contains("job size mismatch"),
        "{}",
        wrong_job.log()
    );

    // After all that, a proper worker trains as if nothing happened.
    let mut good = Proc::worker(&addr, 0, 32, &["--compute-ms", "0"]);
    good.success();
    server.success();
    let log = server.log();
    assert!(log.contains("in the middle of a frame header"), "{log}");
    assert!(log.contains("finished: 10 rounds"), "{log}");
}

#[test]
fn a_second_push_before_the_reply_is_refused_and_its_round_loses_nothing() {
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "2",
        "--dim",
        "8",
        "--policy",
        "naive",
        "--lr",
        "0.5",
        "--rounds",
        "1",
    ]);
    let mut a = Raw::hello(&addr, 0, 2, 8);
    let mut b = Raw::hello(&addr, 1, 2, 8);
    assert_eq!(a.model().0, 0);
    assert_eq!(b.model().0, 0);
    // b pushes, then pushes again while its slot still belongs to the server.
    b.push(0, &[100.0; 8]);
    b.push(0, &[100.0; 8]);
    assert!(b.error_then_eof().contains("previous push"));
    // b left with its gradient; the round closes on a's alone.
    a.push(0, &[2.0; 8]);
    let (round, model) = a.model();
    assert_eq!(round, 1);
    assert_eq!(
        model,
        vec![-1.0; 8],
        "b's gradient must not be in the round"
    );
    let bye = a.header();
    assert_eq!(bye.kind, FrameKind::Bye);
    server.success();
}

#[test]
fn a_push_before_reading_the_first_models_is_summed_and_nothing_breaks() {
    // 8 MiB in 1 MiB parts: the first models queue in the server while this peer pushes part 7
    // without reading them. Their going out later must not hand the held slot back.
    const DIM: usize = 1 << 21;
    const PART: usize = 1 << 18;
    let dir = common::scratch("early-push");
    let model = dir.join("model.f32");
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "2",
        "--dim",
        &DIM.to_string(),
        "--partition-kib",
        "1024",
        "--policy",
        "naive",
        "--lr",
        "0.5",
        "--rounds",
        "1",
        "--save-model",
        model.to_str().unwrap(),
    ]);
    let raw = &mut Raw::hello(&addr, 0, 2, DIM as u64);
    socket2::SockRef::from(&raw.0)
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    let mut other = Proc::worker(&addr, 1, DIM, &["--compute-ms", "0", "--rounds", "1"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let push = |raw: &mut Raw, key: u32| {
        let body: Vec<u8> = [1.0f32; PART]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        raw.send(&Header::new(FrameKind::Push, key, 0, body.len() as u64).encode());
        raw.send(&body);
    };
    push(raw, 7);
    for _ in 0..8 {
        assert_eq!(raw.model().0, 0);
    }
    for key in 0..7 {
        push(raw, key);
    }
    for _ in 0..8 {
        assert_eq!(raw.model().0, 1);
    }
    server.success();
    other.success();
    // Round 1 from zero: -0.5 * mean(1, 0 - target_1) everywhere, part 7 included.
    let got = common::read_model(&model);
    let t1 = hetsync::worker::target(1, 0, DIM, 1);
    for i in [0, PART * 7, DIM - 1] {
        let want = -0.5 * (1.0 - t1[i]) / 2.0;
        assert!(
            (got[i] - want).abs() < 1e-6,
            "element {i}: {} != {want}",
            got[i]
        );
    }
}
