//! The worker side of the RDMA transport: each gradient part goes out as an RDMA WRITE from a
//! registered buffer into the worker's slot on the server, through the window the server lent it
//! for that slot, then a SEND_WITH_INV of its clock stamp that gives the window back; each model
//! part comes back as a stamp and an RDMA_WRITE_WITH_IMM into a registered buffer, its immediate
//! naming the part and the key byte of the slot's next lend; the channel's [`WorkerEnd`] carries
//! the handshake, goodbyes and errors.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::spin::Spin;

use hetsync_ffi::{
    Access, Completed, Completion, CompletionQueue, Endpoint, Gid, MemoryRegion, ProtectionDomain,
    QpCaps, QueuePair, RemoteBuffer, SendOp,
};
use memmap2::MmapMut;

use super::{random_psn, Local, MAX_INFLIGHT, RECV_DEPTH, SEND_DEPTH, STAMP_WR};
use crate::channel::WorkerEnd;
use crate::protocol::rdma::{split_model_imm, with_key_byte, BlockLayout};
use crate::protocol::{FrameKind, Parts, RdmaAccept, RdmaParams};
use crate::{Clock, Incoming, Key, LinkError, WorkerLink};

/// How long a push may wait for room in the send queue before the link is declared broken.
const SEND_LIMIT: Duration = Duration::from_secs(30);
/// How long a cancelled link waits for the NIC to flush its requests.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// A worker's RDMA link. Field order is teardown order: the queue pair and registrations go
/// before the CQs, PD and device; the control connection goes last.
pub struct RdmaClient {
    qp: QueuePair,
    /// Gradients to send, laid out as [`BlockLayout`]; its stamp table holds the push clocks.
    grads: MemoryRegion<MmapMut>,
    /// Models received, laid out as [`BlockLayout`]; the server writes stamps and data here.
    models: MemoryRegion<MmapMut>,
    block: BlockLayout,
    /// The server's slot block for this worker (its rkey unused: writes go through windows).
    slots: RemoteBuffer,
    /// Per part, the key of the window the server lends over this worker's slot of it, as of
    /// the last model of that part.
    windows: Vec<u32>,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    _pd: ProtectionDomain,
    local: Local,
    /// Part writes posted and not completed.
    inflight: u32,
    /// Models that landed (their receives already re-posted) and were not handed out yet.
    landed: VecDeque<Incoming>,
    /// The server said goodbye (seen while pushing): nothing more will come.
    ended: bool,
    completions: Vec<Completion>,
    control: WorkerEnd,
    /// How long a wait polls the completion queue before sleeping on its channel.
    spin: Spin,
}

impl std::fmt::Debug for RdmaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaClient")
            .field("device", &self.local.describe())
            .field("qpn", &self.qp.qpn())
            .finish()
    }
}

/// What [`RdmaClient::upgrade`] ended with.
#[derive(Debug)]
pub enum Upgrade {
    /// The link now moves data over RDMA.
    Rdma(Box<RdmaClient>),
    /// The server has no RDMA: the channel goes on over TCP, and here is why.
    Declined(WorkerEnd, String),
}

fn map(len: usize) -> Result<MmapMut, LinkError> {
    MmapMut::map_anon(len.max(1))
        .map_err(|e| LinkError::NoRdma(format!("mmap of {len} bytes: {e}")))
}

impl RdmaClient {
    /// Offers RDMA on a fresh channel (right after the handshake). The server either accepts
    /// (the link moves data over RDMA from now on) or declines.
    pub fn upgrade(mut control: WorkerEnd, local: Local) -> Result<Upgrade, LinkError> {
        let block = BlockLayout::new(control.parts());
        // A receive for every part: the server writes at most one model per part at a time (the
        // join's, or the answer to that part's push), so it never waits for a receive here, even
        // while this worker computes for long without taking its models.
        // (Capped at 16,384, what rxe allows a queue pair.)
        let recv_depth = RECV_DEPTH
            .max(control.parts().len() as u32 + 8)
            .min(1 << 14);
        // This side's verbs objects and registrations. When they fail (a low locked-memory
        // limit, most often), the worker says so with an empty endpoint and carries on over TCP
        // if it may: the server declines it like any worker it cannot set up.
        let mine = (|| {
            let pd = local.ctx.alloc_pd()?;
            let send_cq = local.ctx.create_cq(SEND_DEPTH as i32 + 8, false)?;
            let recv_cq = local.ctx.create_cq(recv_depth as i32 + 8, true)?;
            let caps = QpCaps {
                max_send: SEND_DEPTH,
                max_recv: recv_depth,
            };
            let qp = pd.create_rc_qp(&send_cq, &recv_cq, caps)?;
            let grads = pd.register(map(block.len())?, Access::LOCAL_WRITE)?;
            let rw = Access::LOCAL_WRITE | Access::REMOTE_WRITE;
            let models = pd.register(map(block.len())?, rw)?;
            Ok::<_, LinkError>((pd, send_cq, recv_cq, qp, grads, models))
        })();
        let (pd, send_cq, recv_cq, mut qp, grads, models) = match mine {
            Ok(m) => m,
            Err(e) => {
                let unable = RdmaParams::unable().encode();
                control.send_control(FrameKind::RdmaConnect, &unable)?;
                control.read_control(FrameKind::RdmaConnect)?;
                let why = format!("this worker could not set up RDMA: {e}");
                return Ok(Upgrade::Declined(control, why));
            }
        };
        let psn = random_psn();
        let mine = models.remote(0..block.len());
        let offer = RdmaParams {
            qpn: qp.qpn(),
            psn,
            lid: local.lid,
            gid: local.gid.0,
            addr: mine.addr,
            len: mine.len,
            rkey: mine.rkey,
        };
        control.send_control(FrameKind::RdmaConnect, &offer.encode())?;
        let reply = control.read_control(FrameKind::RdmaConnect)?;
        if reply.is_empty() {
            let why = format!(
                "server {} declined RDMA (it has no device, or could not set this worker up: its log says why)",
                control.peer()
            );
            return Ok(Upgrade::Declined(control, why));
        }
        let parts = control.parts().len();
        let RdmaAccept {
            params: accept,
            windows,
        } = RdmaAccept::decode(&reply, parts).map_err(|e| LinkError::NoRdma(e.to_string()))?;
        if accept.len < block.len() as u64 {
            return Err(LinkError::NoRdma(format!(
                "the server offered {} bytes of slots, the job needs {}",
                accept.len,
                block.len()
            )));
        }
        let remote = Endpoint {
            qpn: accept.qpn,
            psn: accept.psn,
            gid: Gid(accept.gid),
            lid: accept.lid,
        };
        qp.connect(local.path, psn, &remote)?;
        // Receives need a connected queue pair. The server writes models only once this worker
        // has joined, which it reports only after the "ready" below.
        for i in 0..recv_depth {
            qp.post_recv_imm(u64::from(i))?;
        }
        recv_cq.arm()?;
        control.send_control(FrameKind::RdmaConnect, &[])?;
        Ok(Upgrade::Rdma(Box::new(RdmaClient {
            qp,
            grads,
            models,
            block,
            slots: RemoteBuffer {
                addr: accept.addr,
                len: accept.len,
                rkey: accept.rkey,
            },
            windows,
            send_cq,
            recv_cq,
            _pd: pd,
            local,
            inflight: 0,
            landed: VecDeque::new(),
            ended: false,
            completions: Vec::new(),
            spin: Spin::new(crate::default_spin()),
            control,
        })))
    }

    /// The device, port and GID in use.
    pub fn describe(&self) -> String {
        self.local.describe()
    }

    /// Reaps the completions of part writes (without waiting).
    fn reap_sends(&mut self) -> Result<(), LinkError> {
        self.completions.clear();
        self.send_cq.poll(&mut self.completions, usize::MAX)?;
        for c in self.completions.drain(..) {
            c.result?;
            if c.wr_id & STAMP_WR == 0 {
                self.inflight -= 1;
            }
        }
        Ok(())
    }

    /// Takes every model that landed (without waiting), re-posting its receive at once so the
    /// receive queue never runs dry while this worker is busy pushing.
    fn drain_models(&mut self) -> Result<(), LinkError> {
        self.reap_sends()?;
        self.completions.clear();
        self.recv_cq.poll(&mut self.completions, usize::MAX)?;
        for c in std::mem::take(&mut self.completions) {
            match c.result {
                Ok(Completed::RecvRdmaWithImm { imm, len }) => {
                    self.qp.post_recv_imm(c.wr_id)?;
                    let (key, byte) = split_model_imm(imm);
                    let part = self.control.parts().get(key).map_err(|e| {
                        LinkError::NoRdma(format!("the server wrote an unknown part: {e}"))
                    })?;
                    if part.bytes() != len as usize {
                        return Err(LinkError::NoRdma(format!(
                            "the server wrote {len} bytes of part {key}, which has {}",
                            part.bytes()
                        )));
                    }
                    // The slot is (still or again) lent, under this key.
                    let w = &mut self.windows[key as usize];
                    *w = with_key_byte(*w, byte);
                    // The stamp was written just before the data, on the same queue pair.
                    let stamp = &self.models.bytes()[self.block.stamp(key)];
                    let round = Clock::from_le_bytes(stamp.try_into().expect("8 bytes"));
                    self.landed.push_back(Incoming::Model { key, round });
                }
                Ok(other) => {
                    return Err(LinkError::NoRdma(format!(
                        "unexpected completion {other:?}"
                    )))
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Waits up to `ms` for the control connection to become readable; when it does, reads what
    /// came (the server's goodbye, or its error).
    fn watch_control(&mut self, ms: i32) -> Result<(), LinkError> {
        let mut fd = libc::pollfd {
            fd: self.control.stream().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n > 0 && fd.revents != 0 {
            self.control.read_shutdown()?;
            self.ended = true;
        }
        Ok(())
    }

    /// The next model that landed, if any (without waiting).
    fn take_model(&mut self) -> Result<Option<Incoming>, LinkError> {
        if self.landed.is_empty() {
            self.drain_models()?;
        }
        Ok(self.landed.pop_front())
    }
}

impl RdmaClient {
    /// Cancels every request still posted (the queue pair goes to the error state) and waits,
    /// bounded, until the NIC has flushed them: after that it reads none of this link's
    /// buffers. Returns the error that ends the link, saying why.
    fn cancel(&mut self, why: String) -> LinkError {
        let flushed = self.qp.cancel_all().map(|()| {
            let deadline = Instant::now() + FLUSH_LIMIT;
            while self.inflight > 0 && Instant::now() < deadline {
                self.completions.clear();
                if self
                    .send_cq
                    .poll(&mut self.completions, usize::MAX)
                    .is_err()
                {
                    break;
                }
                let parts = self.completions.iter().filter(|c| c.wr_id & STAMP_WR == 0);
                self.inflight -= parts.count() as u32;
                std::thread::sleep(Duration::from_millis(1));
            }
            self.inflight == 0
        });
        let how = match flushed {
            Ok(true) => "its writes were cancelled",
            Ok(false) => "its writes did not flush in time either",
            Err(_) => "its queue pair could not even be stopped",
        };
        LinkError::NoRdma(format!("{why}; {how}"))
    }
}

impl WorkerLink for RdmaClient {
    fn parts(&self) -> &Parts {
        self.control.parts()
    }

    fn push_clock(&self) -> crate::protocol::PushClock {
        self.control.push_clock()
    }

    fn tensor(&mut self, t: usize) -> (&[f32], &mut [f32]) {
        let r = self.block.tensor(t, self.control.parts().dims()[t] * 4);
        let model = &self.models.bytes()[r.clone()];
        let grad = &mut self.grads.bytes_mut()[r];
        (bytemuck::cast_slice(model), bytemuck::cast_slice_mut(grad))
    }

    fn model(&self, t: usize) -> &[f32] {
        let r = self.block.tensor(t, self.control.parts().dims()[t] * 4);
        bytemuck::cast_slice(&self.models.bytes()[r])
    }

    fn push(&mut self, key: Key, clock: Clock) -> Result<(), LinkError> {
        self.drain_models()?;
        let deadline = Instant::now() + SEND_LIMIT;
        while self.inflight >= MAX_INFLIGHT && !self.ended {
            self.reap_sends()?;
            if self.inflight < MAX_INFLIGHT {
                break;
            }
            if Instant::now() > deadline {
                return Err(self.cancel(format!(
                    "part writes did not complete within {SEND_LIMIT:?}"
                )));
            }
            // A server that has ended the run stops taking writes: watch for its goodbye.
            self.watch_control(1)?;
        }
        if self.ended {
            // The run is over; the next wait says so.
            return Ok(());
        }
        let (stamp, data) = (self.block.stamp(key), self.block.data(key));
        self.grads.bytes_mut()[stamp.clone()].copy_from_slice(&clock.to_le_bytes());
        let window = self.windows[key as usize];
        let through = RemoteBuffer {
            rkey: window,
            ..self.slots
        };
        // SAFETY: the gradient buffer is owned by this link; the part's stamp and data are not
        // written again until the server has answered this push (the worker API waits for the
        // part's model, which the server sends only after this push has landed), and the
        // registration lives as long as the link (its queue pair, declared first, goes first).
        unsafe {
            self.qp.post_send(
                STAMP_WR,
                SendOp::Write,
                &self.grads,
                data.clone(),
                Some((through, data.start as u64)),
            )?;
            self.qp.post_send(
                u64::from(key),
                SendOp::SendWithInv(window),
                &self.grads,
                stamp,
                None,
            )?;
        }
        self.inflight += 1;
        Ok(())
    }

    fn set_spin(&mut self, spin: Duration) {
        self.spin = Spin::new(spin);
    }

    fn wait_model_for(&mut self, timeout: Option<Duration>) -> Result<Option<Incoming>, LinkError> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let until = self.spin.until(start);
        let spin_until = deadline.map_or(until, |d| d.min(until));
        loop {
            if let Some(m) = self.take_model()? {
                self.spin.answered_after(start.elapsed());
                return Ok(Some(m));
            }
            if self.ended {
                return Ok(Some(Incoming::Shutdown));
            }
            if Instant::now() < spin_until {
                // A model about to land is taken from the queue without a wake-up.
                std::hint::spin_loop();
                continue;
            }
            // Milliseconds left, rounded up (-1: no limit).
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
                }
            };
            let cq_fd = self.recv_cq.fd().expect("created with a channel");
            let mut fds = [
                libc::pollfd {
                    fd: cq_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.control.stream().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    if timeout.is_some() {
                        return Ok(None); // let the caller look at the signal
                    }
                    continue;
                }
                return Err(LinkError::NoRdma(format!(
                    "poll on the completion channel: {e}"
                )));
            }
            if fds[0].revents != 0 {
                self.recv_cq.ack_events()?;
                self.recv_cq.arm()?;
                continue; // poll the CQ again: arming then polling misses nothing
            }
            if fds[1].revents != 0 {
                // The model may have landed just before the goodbye: prefer it.
                if let Some(m) = self.take_model()? {
                    return Ok(Some(m));
                }
                return self.control.read_shutdown().map(Some);
            }
        }
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        self.control.bye()
    }
}
