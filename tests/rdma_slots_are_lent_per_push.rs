//! Workers that break the RDMA push protocol, against the real server (in CI: inside the
//! Soft-RoCE guest, tests/guest/). A slot is writable only while it is lent to its worker: a
//! write after the push gave it back, a write outside the lent slot, a push that does not give
//! it back, and a push over the TCP control connection each cost that worker its connection,
//! with the reason in the server's log, while two honest RDMA workers train on. Outside the
//! guest, with no RDMA device, it prints a SKIP line (and fails where HETSYNC_REQUIRE_RDMA is
//! set).
#![cfg(feature = "rdma")]

mod common;

use std::time::{Duration, Instant};

use common::Proc;
use hetsync_transport::channel::WorkerEnd;
use hetsync_transport::protocol::rdma::{split_model_imm, with_key_byte, BlockLayout};
use hetsync_transport::protocol::{FrameKind, Header, Hello, RdmaAccept, RdmaParams};
use hetsync_transport::rdma::verbs::*;
use memmap2::MmapMut;

const DIM: usize = 4096;
const PART_KIB: &str = "8"; // two parts of 2048 floats

/// A worker that speaks the RDMA protocol by hand, to break it.
struct Rogue {
    control: WorkerEnd,
    qp: QueuePair,
    grads: MemoryRegion<MmapMut>,
    models: MemoryRegion<MmapMut>,
    /// The round of the last model of part 0, which its pushes carry.
    round: u64,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    block: BlockLayout,
    slots: RemoteBuffer,
    windows: Vec<u32>,
}

impl Rogue {
    /// Joins as `rank` over RDMA and waits for its first model of part 0.
    fn join(addr: &str, rank: u32) -> Rogue {
        let hello = Hello {
            rank,
            workers: 3,
            dims: vec![DIM as u64],
            rdma: true,
            auth_nonce: None,
        };
        let mut control = WorkerEnd::connect(addr, &hello, Duration::from_secs(30), None)
            .expect("the rogue's handshake");
        let ctx = Context::open(None).unwrap();
        let port = ctx.active_port(1).unwrap();
        let (gid_index, gid) = ctx.roce_v2_ipv4_gid(1).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let send_cq = ctx.create_cq(64, false).unwrap();
        let recv_cq = ctx.create_cq(64, false).unwrap();
        let caps = QpCaps {
            max_send: 16,
            max_recv: 16,
        };
        let mut qp = pd.create_rc_qp(&send_cq, &recv_cq, caps).unwrap();
        let block = BlockLayout::new(control.parts());
        let map = || MmapMut::map_anon(block.len()).unwrap();
        let grads = pd.register(map(), Access::LOCAL_WRITE).unwrap();
        let models = pd
            .register(map(), Access::LOCAL_WRITE | Access::REMOTE_WRITE)
            .unwrap();
        let mine = models.remote(0..block.len());
        let offer = RdmaParams {
            qpn: qp.qpn(),
            psn: 0x42,
            lid: port.lid,
            gid: gid.0,
            addr: mine.addr,
            len: mine.len,
            rkey: mine.rkey,
        };
        control
            .send_control(FrameKind::RdmaConnect, &offer.encode())
            .unwrap();
        let reply = control.read_control(FrameKind::RdmaConnect).unwrap();
        let accept = RdmaAccept::decode(&reply, control.parts().len()).expect("an RDMA answer");
        assert_eq!(
            accept.params.rkey, 0,
            "the slot block's own key is never handed out"
        );
        let path = PathConfig {
            port: 1,
            gid_index,
            mtu: port.active_mtu,
            global: true,
        };
        let theirs = Endpoint {
            qpn: accept.params.qpn,
            psn: accept.params.psn,
            gid: Gid(accept.params.gid),
            lid: accept.params.lid,
        };
        qp.connect(path, 0x42, &theirs).unwrap();
        for i in 0..16 {
            qp.post_recv_imm(i).unwrap();
        }
        control.send_control(FrameKind::RdmaConnect, &[]).unwrap();
        let mut rogue = Rogue {
            control,
            qp,
            grads,
            models,
            round: 0,
            send_cq,
            recv_cq,
            block,
            slots: RemoteBuffer {
                addr: accept.params.addr,
                len: accept.params.len,
                rkey: 0,
            },
            windows: accept.windows,
        };
        rogue.wait_model(0);
        rogue
    }

    /// Waits for a model of part `key`, taking models of other parts on the way.
    fn wait_model(&mut self, key: u32) {
        let deadline = Instant::now() + common::HANG;
        while !self.take_models().contains(&key) {
            assert!(Instant::now() < deadline, "no model of part {key} came");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Takes the models that landed, re-posting their receives as a worker does, and returns
    /// their parts. Stops at a failed receive (the queue pair broke: the server says why).
    fn take_models(&mut self) -> Vec<u32> {
        let mut got = Vec::new();
        self.recv_cq.poll(&mut got, 16).unwrap();
        let mut parts = Vec::new();
        for c in got {
            let Ok(Completed::RecvRdmaWithImm { imm, .. }) = c.result else {
                break;
            };
            self.qp.post_recv_imm(c.wr_id).unwrap();
            let (k, byte) = split_model_imm(imm);
            let w = &mut self.windows[k as usize];
            *w = with_key_byte(*w, byte);
            if k == 0 {
                let stamp = &self.models.bytes()[self.block.stamp(k)];
                self.round = u64::from_le_bytes(stamp.try_into().unwrap());
            }
            parts.push(k);
        }
        parts
    }

    /// Writes part `key`'s gradient to byte `at` of the slot block with window key `rkey`, and
    /// returns the write's completion.
    fn write(&mut self, key: u32, at: u64, rkey: u32) -> Result<Completed, CompletionError> {
        let data = self.block.data(key);
        let through = RemoteBuffer { rkey, ..self.slots };
        // SAFETY: the gradient buffer lives, unchanged, until the completion is polled below.
        unsafe {
            self.qp
                .post_send(1, SendOp::Write, &self.grads, data, Some((through, at)))
                .unwrap()
        };
        self.completion()
    }

    /// Sends part `key`'s stamp (the round of its model), invalidating `invalidate` or nothing.
    fn send_stamp(
        &mut self,
        key: u32,
        invalidate: Option<u32>,
    ) -> Result<Completed, CompletionError> {
        let op = invalidate.map_or(SendOp::Send, SendOp::SendWithInv);
        let stamp = self.block.stamp(key);
        self.grads.bytes_mut()[stamp].copy_from_slice(&self.round.to_le_bytes());
        // SAFETY: as in `write`.
        unsafe {
            self.qp
                .post_send(2, op, &self.grads, self.block.stamp(key), None)
                .unwrap()
        };
        self.completion()
    }

    fn completion(&mut self) -> Result<Completed, CompletionError> {
        let deadline = Instant::now() + common::HANG;
        loop {
            let mut got = Vec::new();
            self.send_cq.poll(&mut got, 1).unwrap();
            if let Some(c) = got.pop() {
                return c.result;
            }
            self.take_models();
            assert!(Instant::now() < deadline, "a rogue request never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The server's reason for dropping this worker (its error frame), taking models meanwhile.
    /// Within 20 s: it takes milliseconds, and a server that stalls its event loop tearing the
    /// rogue down (rxe destroying a queue pair with windows still bound: 51 s) must fail here.
    fn dropped_because(mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = self.control.stream().try_clone().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        while stream.peek(&mut [0u8; 1]).is_err() {
            self.take_models();
            assert!(
                Instant::now() < deadline,
                "the server never dropped the rogue"
            );
        }
        stream.set_read_timeout(None).unwrap();
        match self.control.read_shutdown() {
            Err(hetsync_transport::LinkError::Refused { reason, .. }) => reason,
            other => panic!("expected the server to drop the rogue, got {other:?}"),
        }
    }
}

/// Checks the rogue's write failed at the server's NIC (`what` says why it must), and that the
/// server then dropped the rogue for its broken queue pair.
fn refused_then_dropped(rogue: Rogue, write: Result<Completed, CompletionError>, what: &str) {
    let err = write.expect_err(what);
    assert!(
        err.is_remote_access(),
        "expected a remote access error, got {err}"
    );
    let why = rogue.dropped_because();
    assert!(why.contains("queue pair failed"), "{why}");
}

#[test]
fn a_slot_is_writable_only_while_it_is_lent() {
    if !common::rdma_here() {
        return;
    }
    let (mut server, addr) = Proc::server(&[
        "--workers",
        "3",
        "--dim",
        &DIM.to_string(),
        "--partition-kib",
        PART_KIB,
        "--policy",
        "timeout",
        "--timeout-ms",
        "30",
        "--rounds",
        "1000000",
        "--transport",
        "rdma",
    ]);
    // The rogue joins first (the run starts once all three have).
    let joining = {
        let addr = addr.clone();
        std::thread::spawn(move || Rogue::join(&addr, 2))
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut honest: Vec<Proc> = (0..2)
        .map(|r| Proc::worker(&addr, r, DIM, &["--transport", "rdma", "--compute-ms", "5"]))
        .collect();
    let mut rogue = joining.join().unwrap();

    // 1. A push that gives the slot back, then a write into it anyway: refused at the server's
    // NIC, and the server drops the rogue.
    let lent = rogue.windows[0];
    let at = rogue.block.data(0).start as u64;
    assert_eq!(
        rogue.write(0, at, lent),
        Ok(Completed::RdmaWrite),
        "a lent slot takes a write"
    );
    assert_eq!(rogue.send_stamp(0, Some(lent)), Ok(Completed::Send));
    let refused = rogue.write(0, at, lent);
    refused_then_dropped(rogue, refused, "a slot given back must refuse writes");

    // 2. A write with part 0's window into part 1's slot: outside what was lent.
    let mut rogue = Rogue::join(&addr, 2);
    let part1 = rogue.block.data(1).start as u64;
    let refused = rogue.write(0, part1, rogue.windows[0]);
    refused_then_dropped(rogue, refused, "a window reaches only its own slot");

    // 3. A push whose send does not give the slot back.
    let mut rogue = Rogue::join(&addr, 2);
    assert_eq!(
        rogue.write(0, at, rogue.windows[0]),
        Ok(Completed::RdmaWrite)
    );
    assert_eq!(rogue.send_stamp(0, None), Ok(Completed::Send));
    let why = rogue.dropped_because();
    assert!(why.contains("without giving its slot back"), "{why}");

    // 4. A push over the TCP control connection, around the window: the slot would be the
    // server's while the window lent for it stays valid. Refused.
    let mut rogue = Rogue::join(&addr, 2);
    let len = rogue.block.data(0).len();
    let mut frame = Header::new(FrameKind::Push, 0, rogue.round, len as u64)
        .encode()
        .to_vec();
    frame.resize(frame.len() + len, 0);
    rogue.control.write_all(&frame, "push over TCP").unwrap();
    let why = rogue.dropped_because();
    assert!(
        why.contains("over TCP from a worker whose pushes go over RDMA"),
        "{why}"
    );

    // The honest workers train on, over RDMA: 30 more rounds once the rogue is gone (the
    // rounds are unbounded so that the run outlasts the rogue however fast the machine; SIGTERM
    // ends it).
    let rounds = |v: &serde_json::Value| v["rounds"].as_u64().unwrap_or(0);
    let after_rogue = rounds(&common::status(&addr, &[]).expect("status"));
    let deadline = Instant::now() + common::HANG;
    while rounds(&common::status(&addr, &[]).expect("status")) < after_rogue + 30 {
        assert!(
            Instant::now() < deadline,
            "training stalled after the rogue:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    for w in &mut honest {
        w.success();
        assert!(w.log().contains("transport rdma"), "{}", w.log());
        assert!(w.log().contains("the server ended the run"), "{}", w.log());
    }
    server.success();
    let log = server.log();
    if std::env::var_os("HETSYNC_TEST_VERBOSE").is_some() {
        eprintln!("{log}");
        for w in &honest {
            eprintln!("HONEST {}", w.log());
        }
    }
    let rounds = common::summary_count(&log, "finished:");
    assert!(rounds >= after_rogue + 30, "{log}");
    assert_eq!(
        log.matches("queue pair failed").count(),
        2,
        "each broken queue pair is reported once:\n{log}"
    );
}
