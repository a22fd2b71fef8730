//! What lending a slot per push costs: a round trip of a model write and a gradient push between
//! two queue pairs on one device, without and with memory windows, interleaved in batches so that
//! both see the same machine. Run it where there is an RDMA device (the Soft-RoCE guest:
//! tests/guest/):
//!
//!     window_cost [BYTES] [ROUNDS]     (defaults: 65536 and 300)
//!
//! "plain": the server writes the model (WRITE_WITH_IMM), the worker writes its gradient into a
//! slot registered for remote writes (WRITE_WITH_IMM). "windowed": the server binds a window over
//! the slot, then writes the model; the worker writes its gradient through the window and gives
//! it back with a SEND_WITH_INV of its 8-byte stamp, as Het-Sync does.

use std::time::{Duration, Instant};

use hetsync_ffi::*;

struct Side {
    qp: QueuePair,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
}

fn wait(cq: &CompletionQueue) -> Completion {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    loop {
        cq.poll(&mut got, 1).expect("poll");
        if let Some(c) = got.pop() {
            c.result.as_ref().expect("a completion");
            return c;
        }
        assert!(Instant::now() < deadline, "a request never completed");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let bytes: usize = args.next().map_or(65536, |a| a.parse().expect("BYTES"));
    let rounds: usize = args.next().map_or(300, |a| a.parse().expect("ROUNDS"));
    let ctx = Context::open(None).expect("an RDMA device");
    let port = ctx.active_port(1).expect("an active port");
    let (gid_index, gid) = ctx.roce_v2_ipv4_gid(1).expect("a RoCE v2 GID");
    let pd = ctx.alloc_pd().expect("a PD");
    let side = || {
        let send_cq = ctx.create_cq(64, false).unwrap();
        let recv_cq = ctx.create_cq(64, false).unwrap();
        let qp = pd
            .create_rc_qp(&send_cq, &recv_cq, QpCaps::default())
            .unwrap();
        Side {
            qp,
            send_cq,
            recv_cq,
        }
    };
    let (mut server, mut worker) = (side(), side());
    let path = PathConfig {
        port: 1,
        gid_index,
        mtu: port.active_mtu,
        global: true,
    };
    let ends = |s: &Side, psn| Endpoint {
        qpn: s.qp.qpn(),
        psn,
        gid,
        lid: port.lid,
    };
    let (es, ew) = (ends(&server, 1), ends(&worker, 2));
    server.qp.connect(path, 1, &ew).unwrap();
    worker.qp.connect(path, 2, &es).unwrap();

    let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
    let model_src = pd.register(vec![1u8; bytes], Access::LOCAL_WRITE).unwrap();
    let model_dst = pd.register(vec![0u8; bytes], rw).unwrap();
    let grad_src = pd
        .register(vec![2u8; bytes + 8], Access::LOCAL_WRITE)
        .unwrap();
    let slot_open = pd.register(vec![0u8; bytes], rw).unwrap();
    let slot_lent = pd
        .register(vec![0u8; bytes], Access::LOCAL_WRITE | Access::MW_BIND)
        .unwrap();
    let inbox = pd.register(vec![0u8; 8], Access::LOCAL_WRITE).unwrap();
    let mut window = pd.alloc_mw().unwrap();
    let to_worker = model_dst.remote(0..bytes);

    let plain = |server: &mut Side, worker: &mut Side| {
        let t = Instant::now();
        worker.qp.post_recv_imm(0).unwrap();
        server.qp.post_recv_imm(0).unwrap();
        // SAFETY (all posts here): every buffer lives, unchanged, until main returns, and each
        // request's completion is polled before the next round.
        unsafe {
            let to = Some((to_worker, 0));
            server
                .qp
                .post_send(1, SendOp::WriteWithImm(0), &model_src, 0..bytes, to)
                .unwrap();
        }
        wait(&worker.recv_cq);
        wait(&server.send_cq);
        unsafe {
            let to = Some((slot_open.remote(0..bytes), 0));
            worker
                .qp
                .post_send(2, SendOp::WriteWithImm(0), &grad_src, 0..bytes, to)
                .unwrap();
        }
        wait(&server.recv_cq);
        wait(&worker.send_cq);
        t.elapsed()
    };
    let mut windowed = |server: &mut Side, worker: &mut Side| {
        let t = Instant::now();
        worker.qp.post_recv_imm(0).unwrap();
        // SAFETY: as above; `window`, declared after `slot_lent`, is dropped before it, and the
        // slot is never read.
        unsafe {
            server.qp.post_recv(0, &inbox, 0..8).unwrap();
            let rkey = server
                .qp
                .post_bind(3, &mut window, &slot_lent, 0..bytes, Access::REMOTE_WRITE)
                .unwrap();
            let to = Some((to_worker, 0));
            server
                .qp
                .post_send(1, SendOp::WriteWithImm(0), &model_src, 0..bytes, to)
                .unwrap();
            wait(&worker.recv_cq);
            wait(&server.send_cq);
            wait(&server.send_cq);
            let through = RemoteBuffer {
                rkey,
                ..slot_lent.remote(0..bytes)
            };
            worker
                .qp
                .post_send(2, SendOp::Write, &grad_src, 0..bytes, Some((through, 0)))
                .unwrap();
            worker
                .qp
                .post_send(
                    4,
                    SendOp::SendWithInv(rkey),
                    &grad_src,
                    bytes..bytes + 8,
                    None,
                )
                .unwrap();
        }
        let got = wait(&server.recv_cq);
        assert!(matches!(
            got.result,
            Ok(Completed::Recv {
                invalidated: Some(_),
                ..
            })
        ));
        wait(&worker.send_cq);
        wait(&worker.send_cq);
        t.elapsed()
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..rounds / 10 {
        for _ in 0..10 {
            a.push(plain(&mut server, &mut worker));
        }
        for _ in 0..10 {
            b.push(windowed(&mut server, &mut worker));
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (ma, mb) = (median(&mut a), median(&mut b));
    println!(
        "window_cost: {bytes} bytes each way, {} round trips of each, on {}",
        a.len(),
        ctx.name()
    );
    println!("  plain     median {ma:?}");
    println!("  windowed  median {mb:?}");
    println!(
        "  windowed / plain = {:.3}",
        mb.as_secs_f64() / ma.as_secs_f64()
    );
}
