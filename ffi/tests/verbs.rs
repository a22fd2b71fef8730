//! The verbs wrappers against a real device. In CI these run inside the Soft-RoCE guest
//! (tests/guest/), where HETSYNC_REQUIRE_RDMA=1 makes a missing device a failure. On a host with
//! no RDMA they check the other half of the contract: a typed "no RDMA here" error.

use std::time::{Duration, Instant};

use hetsync_ffi::*;
use memmap2::MmapMut;

fn require_rdma() -> bool {
    std::env::var_os("HETSYNC_REQUIRE_RDMA").is_some()
}

/// The device to test on, or `None` on a host without RDMA (after checking the error is typed).
fn device() -> Option<Context> {
    match Context::open(std::env::var("HETSYNC_RDMA_DEVICE").ok().as_deref()) {
        Ok(ctx) => Some(ctx),
        Err(VerbsError::NoDevice(why)) if !require_rdma() => {
            eprintln!(
                "SKIP: no RDMA device on this host ({why}); the real run is in the Soft-RoCE guest"
            );
            None
        }
        Err(e) => panic!("opening the RDMA device failed: {e}"),
    }
}

#[test]
fn no_device_is_a_typed_error_and_a_device_is_listed_where_there_is_one() {
    match device_names() {
        Ok(names) => assert!(!names.is_empty()),
        Err(VerbsError::NoDevice(why)) => {
            assert!(!require_rdma(), "no RDMA device in the guest: {why}");
            assert!(why.contains("RDMA") || why.contains("devices"), "{why}");
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    match Context::open(Some("no-such-hca")) {
        Err(VerbsError::NoDevice(why)) => assert!(why.contains("no-such-hca") || !require_rdma()),
        other => panic!("opening a missing device: {other:?}"),
    }
}

/// Two RC queue pairs on one device, connected to each other over its RoCE v2 GID.
struct Loop {
    ctx: Context,
    pd: ProtectionDomain,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    a: QueuePair,
    b: QueuePair,
}

fn connected_pair() -> Option<Loop> {
    let ctx = device()?;
    let port = ctx.active_port(1).expect("port 1 active");
    let (gid_index, gid) = ctx.roce_v2_ipv4_gid(1).expect("a RoCE v2 IPv4 GID");
    let pd = ctx.alloc_pd().unwrap();
    let send_cq = ctx.create_cq(64, false).unwrap();
    let recv_cq = ctx.create_cq(64, true).unwrap();
    let mut a = pd
        .create_rc_qp(&send_cq, &send_cq, QpCaps::default())
        .unwrap();
    let mut b = pd
        .create_rc_qp(&send_cq, &recv_cq, QpCaps::default())
        .unwrap();
    let path = PathConfig {
        port: 1,
        gid_index,
        mtu: port.active_mtu,
        global: true,
    };
    let ea = Endpoint {
        qpn: a.qpn(),
        psn: 0x1234,
        gid,
        lid: port.lid,
    };
    let eb = Endpoint {
        qpn: b.qpn(),
        psn: 0x5678,
        gid,
        lid: port.lid,
    };
    a.connect(path, ea.psn, &eb).unwrap();
    b.connect(path, eb.psn, &ea).unwrap();
    Some(Loop {
        ctx,
        pd,
        send_cq,
        recv_cq,
        a,
        b,
    })
}

/// Polls until `n` completions arrived (bounded: only catches a hang).
fn wait_for(cq: &CompletionQueue, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < n {
        let want = n - got.len();
        cq.poll(&mut got, want).unwrap();
        assert!(
            Instant::now() < deadline,
            "only {} of {n} completions: {got:?}",
            got.len()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    got
}

#[test]
fn write_with_imm_lands_exactly_and_carries_the_immediate() {
    let Some(l) = connected_pair() else { return };
    // The receiver: a 1 MiB mmapped region, as the server's slots are.
    let mut target =
        l.pd.register(
            MmapMut::map_anon(1 << 20).unwrap(),
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .unwrap();
    target.bytes_mut().fill(0xEE);
    let remote = target.remote(0..1 << 20);
    // The sender: 64 KiB of a pattern.
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let source = l.pd.register(pattern.clone(), Access::LOCAL_WRITE).unwrap();

    l.b.post_recv_imm(7).unwrap();
    l.recv_cq.arm().unwrap();
    let offset = 4099u64; // deliberately unaligned
                          // SAFETY: `source` lives, unchanged, until its completion is polled below.
    unsafe {
        l.a.post_send(
            1,
            SendOp::WriteWithImm(0xC0FFEE),
            &source,
            0..65536,
            Some((remote, offset)),
        )
        .unwrap()
    };
    let sent = wait_for(&l.send_cq, 1);
    assert_eq!(sent[0].wr_id, 1);
    assert_eq!(sent[0].result, Ok(Completed::RdmaWrite));

    // The completion channel fired for the receive side.
    let fd = l.recv_cq.fd().expect("created with a channel");
    assert!(
        readable(fd, 30_000),
        "the completion channel never became readable"
    );
    assert!(l.recv_cq.ack_events().unwrap() >= 1);
    let got = wait_for(&l.recv_cq, 1);
    assert_eq!(got[0].wr_id, 7);
    assert_eq!(got[0].qp_num, l.b.qpn());
    assert_eq!(
        got[0].result,
        Ok(Completed::RecvRdmaWithImm {
            len: 65536,
            imm: 0xC0FFEE
        })
    );

    let bytes = target.bytes();
    let at = offset as usize;
    assert_eq!(
        &bytes[at..at + 65536],
        &pattern[..],
        "the payload did not land intact"
    );
    assert!(
        bytes[..at].iter().all(|&b| b == 0xEE),
        "bytes before the write changed"
    );
    assert!(
        bytes[at + 65536..].iter().all(|&b| b == 0xEE),
        "bytes after the write changed"
    );
    drop(l.ctx);
}

#[test]
fn a_send_lands_in_a_posted_receive_buffer() {
    let Some(l) = connected_pair() else { return };
    let inbox = l.pd.register(vec![0u8; 4096], Access::LOCAL_WRITE).unwrap();
    // SAFETY: `inbox` lives and is not touched until the receive completion is polled below.
    unsafe { l.b.post_recv(21, &inbox, 100..1100).unwrap() };
    let msg: Vec<u8> = (0..777u32).map(|i| (i % 251) as u8).collect();
    let outbox = l.pd.register(msg.clone(), Access::LOCAL_WRITE).unwrap();
    // SAFETY: `outbox` lives, unchanged, until its completion is polled below.
    unsafe {
        l.a.post_send(20, SendOp::Send, &outbox, 0..777, None)
            .unwrap()
    };
    assert_eq!(wait_for(&l.send_cq, 1)[0].result, Ok(Completed::Send));
    let got = wait_for(&l.recv_cq, 1);
    assert_eq!(got[0].wr_id, 21);
    assert_eq!(
        got[0].result,
        Ok(Completed::Recv {
            len: 777,
            invalidated: None
        })
    );
    assert_eq!(&inbox.bytes()[100..877], &msg[..]);
    assert!(inbox.bytes()[..100]
        .iter()
        .chain(&inbox.bytes()[877..])
        .all(|&b| b == 0));
}

#[test]
fn a_write_past_the_registered_region_fails_with_a_remote_access_error() {
    let Some(l) = connected_pair() else { return };
    let mut target =
        l.pd.register(vec![0u8; 8192], Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
    target.bytes_mut().fill(0x11);
    let remote = target.remote(0..8192);
    let source =
        l.pd.register(vec![0xAB; 4096], Access::LOCAL_WRITE)
            .unwrap();
    // Starts inside, ends 2 KiB past the end.
    // SAFETY: `source` lives, unchanged, until its completion is polled below.
    unsafe {
        l.a.post_send(9, SendOp::Write, &source, 0..4096, Some((remote, 6144)))
            .unwrap()
    };
    let done = wait_for(&l.send_cq, 1);
    let err = done[0]
        .result
        .clone()
        .expect_err("an out-of-range write must fail");
    assert_eq!(err.wr_id, 9);
    assert!(
        err.is_remote_access(),
        "expected a remote access error, got {err}"
    );
    assert!(
        target.bytes().iter().all(|&b| b == 0x11),
        "no byte may be written, not even in range"
    );
    drop(l.b);
}

/// Writes `source[range]` from `a` into `remote` at `offset` and returns the write's completion.
fn write(
    l: &Loop,
    source: &MemoryRegion<Vec<u8>>,
    remote: RemoteBuffer,
    offset: u64,
) -> Completion {
    // SAFETY: `source` lives, unchanged, until its completion is polled here.
    unsafe {
        l.a.post_send(
            1,
            SendOp::Write,
            source,
            0..source.bytes().len(),
            Some((remote, offset)),
        )
        .unwrap()
    };
    wait_for(&l.send_cq, 1).remove(0)
}

#[test]
fn a_window_lends_a_range_and_each_invalidation_takes_it_back() {
    let Some(l) = connected_pair() else { return };
    // The owner's region grants peers nothing by itself: only windows bound over it do.
    let target =
        l.pd.register(vec![0xEEu8; 16384], Access::LOCAL_WRITE | Access::MW_BIND)
            .unwrap();
    let mut window = l.pd.alloc_mw().unwrap();
    let lend = |window: &mut MemoryWindow, wr_id: u64| {
        // SAFETY: the window is dropped (end of test) before `target`, and `target` is only read
        // after the peer's writes completed.
        let rkey = unsafe {
            l.b.post_bind(wr_id, window, &target, 4096..8192, Access::REMOTE_WRITE)
                .unwrap()
        };
        let done = wait_for(&l.send_cq, 1);
        assert_eq!(
            (done[0].wr_id, done[0].result.clone()),
            (wr_id, Ok(Completed::Bind))
        );
        RemoteBuffer {
            addr: target.address_of(&(4096..8192)),
            len: 4096,
            rkey,
        }
    };
    let source =
        l.pd.register(vec![0x5Au8; 4096], Access::LOCAL_WRITE)
            .unwrap();

    // Lent: the peer's write lands, exactly in the window.
    let first = lend(&mut window, 40);
    assert_ne!(first.rkey, target.rkey(), "a window has its own key");
    assert_eq!(
        write(&l, &source, first, 0).result,
        Ok(Completed::RdmaWrite)
    );
    assert!(target.bytes()[4096..8192].iter().all(|&b| b == 0x5A));

    // The peer gives it back with its last message, as a worker's push does.
    let inbox = l.pd.register(vec![0u8; 64], Access::LOCAL_WRITE).unwrap();
    let note = l.pd.register(vec![7u8; 8], Access::LOCAL_WRITE).unwrap();
    // SAFETY: `inbox` and `note` live, untouched, until the completions are polled below.
    unsafe {
        l.b.post_recv(41, &inbox, 0..64).unwrap();
        l.a.post_send(42, SendOp::SendWithInv(first.rkey), &note, 0..8, None)
            .unwrap();
    }
    assert_eq!(wait_for(&l.send_cq, 1)[0].result, Ok(Completed::Send));
    let got = wait_for(&l.recv_cq, 1);
    assert_eq!(
        got[0].result,
        Ok(Completed::Recv {
            len: 8,
            invalidated: Some(first.rkey)
        }),
        "the receiver learns which key the send invalidated"
    );

    // Lent again: a new key, which works; the old one is dead.
    let second = lend(&mut window, 43);
    assert_ne!(second.rkey, first.rkey, "every bind gives a new key");
    assert_eq!(
        second.rkey >> 8,
        first.rkey >> 8,
        "only the low 8 bits change"
    );
    assert_eq!(
        write(&l, &source, second, 0).result,
        Ok(Completed::RdmaWrite)
    );

    // The owner takes it back itself: the next write with that key fails at the owner's NIC,
    // and nothing is written.
    l.b.post_local_invalidate(44, second.rkey).unwrap();
    let done = wait_for(&l.send_cq, 1);
    assert_eq!(
        (done[0].wr_id, done[0].result.clone()),
        (44, Ok(Completed::LocalInv))
    );
    let other =
        l.pd.register(vec![0x99u8; 4096], Access::LOCAL_WRITE)
            .unwrap();
    let err = write(&l, &other, second, 0)
        .result
        .expect_err("a write with an invalidated key must fail");
    assert!(
        err.is_remote_access(),
        "expected a remote access error, got {err}"
    );
    assert!(
        target.bytes()[4096..8192].iter().all(|&b| b == 0x5A),
        "a refused write changed the memory"
    );
    assert!(target.bytes()[..4096]
        .iter()
        .chain(&target.bytes()[8192..])
        .all(|&b| b == 0xEE));
    drop(window);
}

#[test]
fn cancel_all_flushes_every_outstanding_request() {
    let Some(l) = connected_pair() else { return };
    for i in 0..3 {
        l.b.post_recv_imm(60 + i).unwrap();
    }
    l.b.cancel_all().unwrap();
    let got = wait_for(&l.recv_cq, 3);
    for (i, c) in got.iter().enumerate() {
        assert_eq!(c.wr_id, 60 + i as u64);
        let err = c
            .result
            .clone()
            .expect_err("a cancelled receive is flushed");
        assert!(err.is_flushed(), "expected a flush, got {err}");
    }
    // Nothing more goes out: a send posted now completes flushed too (or is refused).
    let note = l.pd.register(vec![1u8; 8], Access::LOCAL_WRITE).unwrap();
    // SAFETY: `note` lives, unchanged, until its completion is polled below.
    let posted = unsafe { l.b.post_send(61, SendOp::Send, &note, 0..8, None) };
    if posted.is_ok() {
        let done = wait_for(&l.send_cq, 1);
        assert!(
            done[0].result.as_ref().is_err_and(|e| e.is_flushed()),
            "{done:?}"
        );
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable.
fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}
