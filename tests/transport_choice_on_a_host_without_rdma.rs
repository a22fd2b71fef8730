//! On a host without RDMA (this one, and CI's: the kernel has no RDMA support), `--transport auto`
//! runs over TCP and says why in one line, and `--transport rdma` fails with a clear message and
//! a non-zero exit. (The RDMA side of the same choice runs in the Soft-RoCE guest: tests/guest/.)

mod common;

use common::Proc;

/// Whether this machine has an RDMA device (then the fallback has nothing to show here).
#[cfg(feature = "rdma")]
fn host_has_rdma() -> bool {
    std::path::Path::new("/sys/class/infiniband")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
}

// A TCP-only build (--no-default-features) says "built without RDMA" instead.
#[cfg(feature = "rdma")]
#[test]
fn auto_falls_back_to_tcp_saying_why_and_rdma_fails_clearly() {
    if host_has_rdma() {
        eprintln!("SKIP: this host has an RDMA device: the fallback is not exercised here");
        return;
    }
    let (mut server, addr) = Proc::server(&["--workers", "1", "--dim", "16", "--rounds", "3"]);
    let mut worker = Proc::worker(&addr, 0, 16, &["--compute-ms", "0"]);
    worker.success();
    server.success();
    let (slog, wlog) = (server.log(), worker.log());
    assert!(
        slog.contains("transport tcp, because no RDMA here"),
        "{slog}"
    );
    assert!(
        wlog.contains("transport tcp, because no RDMA here"),
        "{wlog}"
    );
    assert_eq!(
        slog.matches("transport tcp").count(),
        1,
        "one line, not one per event:\n{slog}"
    );

    let mut rdma_server = Proc::spawn(
        "server --transport rdma",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--dim",
            "16",
            "--transport",
            "rdma",
        ],
    );
    assert!(!rdma_server.wait().success());
    assert!(
        rdma_server.log().contains("error: no RDMA here"),
        "{}",
        rdma_server.log()
    );

    let mut rdma_worker = Proc::worker("127.0.0.1:9", 0, 16, &["--transport", "rdma"]);
    assert!(!rdma_worker.wait().success());
    assert!(
        rdma_worker.log().contains("error: no RDMA here"),
        "{}",
        rdma_worker.log()
    );
}

#[test]
fn a_tcp_server_declines_an_rdma_offer_before_any_model_goes_out() {
    use hetsync::protocol::{control_frame, FrameKind, Header, Hello, RdmaParams};
    use std::io::Write;

    let (mut server, addr) = Proc::server(&[
        "--workers",
        "1",
        "--dim",
        "8",
        "--rounds",
        "1",
        "--transport",
        "tcp",
    ]);
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(common::HANG)).unwrap();
    let next = common::read_frame;
    let hello = Hello {
        rank: 0,
        workers: 1,
        dims: vec![8],
        rdma: true,
        auth_nonce: None,
    };
    s.write_all(&control_frame(FrameKind::Hello, 0, 0, &hello.encode()))
        .unwrap();
    assert_eq!(next(&mut s).0.kind, FrameKind::Welcome);
    let offer = RdmaParams {
        qpn: 1,
        psn: 2,
        lid: 0,
        gid: [0; 16],
        addr: 4096,
        len: 32,
        rkey: 7,
    };
    s.write_all(&control_frame(
        FrameKind::RdmaConnect,
        0,
        0,
        &offer.encode(),
    ))
    .unwrap();
    // The answer comes first, and it is "no": only then is the worker joined and served.
    let (h, _) = next(&mut s);
    assert_eq!((h.kind, h.len), (FrameKind::RdmaConnect, 0));
    let (h, _) = next(&mut s);
    assert_eq!((h.kind, h.clock), (FrameKind::Model, 0));
    let grad: Vec<u8> = [1.0f32; 8].iter().flat_map(|x| x.to_le_bytes()).collect();
    s.write_all(&Header::new(FrameKind::Push, 0, 0, 32).encode())
        .unwrap();
    s.write_all(&grad).unwrap();
    assert_eq!(next(&mut s).0.kind, FrameKind::Model);
    server.success();
}
