//! The worker side of the RDMA transport: gradients go out by RDMA_WRITE_WITH_IMM from a
//! registered buffer into the worker's slot on the server; the model comes back the same way
//! into a registered buffer; the TCP connection carries the handshake, goodbyes and errors.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hetsync_ffi::{
    Access, Completed, Completion, CompletionQueue, Endpoint, Gid, MemoryRegion, ProtectionDomain,
    QpCaps, QueuePair, RemoteBuffer, SendOp,
};
use memmap2::MmapMut;

use super::{random_psn, Local, RECV_DEPTH};
use crate::protocol::{decode_imm, encode_imm, FrameKind, RdmaParams};
use crate::tcp::TcpClient;
use crate::{Incoming, LinkError, WorkerLink};

/// How long a push may wait for its own send completion before the link is declared broken.
const SEND_LIMIT: Duration = Duration::from_secs(30);

/// A worker's RDMA link. Field order is teardown order: the queue pair and registrations go
/// before the CQs, PD and device; the control connection goes last.
pub struct RdmaClient {
    qp: QueuePair,
    grads: Vec<MemoryRegion<MmapMut>>,
    models: Vec<MemoryRegion<MmapMut>>,
    slots: Vec<RemoteBuffer>,
    dims: Vec<usize>,
    send_cq: CompletionQueue,
    recv_cq: CompletionQueue,
    _pd: ProtectionDomain,
    local: Local,
    last_round: u64,
    completions: Vec<Completion>,
    control: TcpClient,
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
    /// The server has no RDMA: the TCP link goes on, and here is why.
    Declined(TcpClient, String),
}

fn map(len: usize) -> Result<MmapMut, LinkError> {
    MmapMut::map_anon(len.max(1))
        .map_err(|e| LinkError::NoRdma(format!("mmap of {len} bytes: {e}")))
}

impl RdmaClient {
    /// Offers RDMA on a fresh TCP link (right after the handshake). `dims` are the job's tensor
    /// sizes. The server either accepts (the link moves data over RDMA from now on) or declines.
    pub fn upgrade(
        mut control: TcpClient,
        local: Local,
        dims: &[usize],
    ) -> Result<Upgrade, LinkError> {
        let pd = local.ctx.alloc_pd()?;
        let send_cq = local.ctx.create_cq(64, false)?;
        let recv_cq = local.ctx.create_cq(64, true)?;
        let mut qp = pd.create_rc_qp(
            &send_cq,
            &recv_cq,
            QpCaps {
                max_send: 16,
                max_recv: RECV_DEPTH,
            },
        )?;
        let mut grads = Vec::new();
        let mut models = Vec::new();
        for &d in dims {
            grads.push(pd.register(map(d * 4)?, Access::LOCAL_WRITE)?);
            models.push(pd.register(map(d * 4)?, Access::LOCAL_WRITE | Access::REMOTE_WRITE)?);
        }
        let psn = random_psn();
        let offer = RdmaParams {
            qpn: qp.qpn(),
            psn,
            lid: local.lid,
            gid: local.gid.0,
            buffers: models
                .iter()
                .zip(dims)
                .map(|(m, &d)| {
                    let b = m.remote(0..d * 4);
                    (b.addr, b.len, b.rkey)
                })
                .collect(),
        };
        control.send_control(FrameKind::RdmaConnect, &offer.encode())?;
        let reply = control.read_control(FrameKind::RdmaConnect)?;
        if reply.is_empty() {
            let why = format!("server {} has no RDMA device", control.peer());
            return Ok(Upgrade::Declined(control, why));
        }
        let accept = RdmaParams::decode(&reply).map_err(|e| LinkError::NoRdma(e.to_string()))?;
        if accept.buffers.len() != dims.len() {
            return Err(LinkError::NoRdma(format!(
                "the server offered {} slots for {} keys",
                accept.buffers.len(),
                dims.len()
            )));
        }
        let remote = Endpoint {
            qpn: accept.qpn,
            psn: accept.psn,
            gid: Gid(accept.gid),
            lid: accept.lid,
        };
        qp.connect(local.path, psn, &remote)?;
        // Receives need a connected queue pair; the server writes a model only after this
        // worker has pushed, so they are posted in time.
        for i in 0..RECV_DEPTH {
            qp.post_recv_imm(u64::from(i))?;
        }
        recv_cq.arm()?;
        Ok(Upgrade::Rdma(Box::new(RdmaClient {
            qp,
            grads,
            models,
            slots: accept
                .buffers
                .iter()
                .map(|&(addr, len, rkey)| RemoteBuffer { addr, len, rkey })
                .collect(),
            dims: dims.to_vec(),
            send_cq,
            recv_cq,
            _pd: pd,
            local,
            last_round: 0,
            completions: Vec::new(),
            control,
        })))
    }

    /// The device, port and GID in use.
    pub fn describe(&self) -> String {
        self.local.describe()
    }

    /// Takes model completions without waiting; returns the first model notification.
    fn take_model(&mut self) -> Result<Option<Incoming>, LinkError> {
        self.completions.clear();
        self.recv_cq.poll(&mut self.completions, 1)?;
        let Some(c) = self.completions.pop() else {
            return Ok(None);
        };
        match c.result {
            Ok(Completed::RecvRdmaWithImm { imm, .. }) => {
                self.qp.post_recv_imm(c.wr_id)?;
                let (key, round) = decode_imm(imm, self.last_round);
                self.last_round = round;
                Ok(Some(Incoming::Model { key, round }))
            }
            Ok(other) => Err(LinkError::NoRdma(format!(
                "unexpected completion {other:?}"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

impl WorkerLink for RdmaClient {
    fn model_and_gradient(&mut self, key: u32) -> (&[f32], &mut [f32]) {
        let d = self.dims[key as usize];
        let model = &self.models[key as usize].bytes()[..d * 4];
        let grad = &mut self.grads[key as usize].bytes_mut()[..d * 4];
        (bytemuck::cast_slice(model), bytemuck::cast_slice_mut(grad))
    }

    fn model(&self, key: u32) -> &[f32] {
        let d = self.dims[key as usize];
        bytemuck::cast_slice(&self.models[key as usize].bytes()[..d * 4])
    }

    fn push(&mut self, key: u32, clock: u64) -> Result<(), LinkError> {
        let len = self.dims[key as usize] * 4;
        let grad = &self.grads[key as usize];
        // SAFETY: the gradient buffer is owned by this link and not touched (no `&mut` to it can
        // exist while this `&self` borrow lives) until the send completion is reaped below.
        unsafe {
            self.qp.post_send(
                clock,
                SendOp::WriteWithImm(encode_imm(key, clock)),
                grad,
                0..len,
                Some((self.slots[key as usize], 0)),
            )?
        };
        let deadline = Instant::now() + SEND_LIMIT;
        loop {
            self.completions.clear();
            self.send_cq.poll(&mut self.completions, 1)?;
            if let Some(c) = self.completions.pop() {
                c.result?;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LinkError::NoRdma(format!(
                    "the push did not complete within {SEND_LIMIT:?}"
                )));
            }
            std::hint::spin_loop();
        }
    }

    fn wait_model(&mut self) -> Result<Incoming, LinkError> {
        loop {
            if let Some(m) = self.take_model()? {
                return Ok(m);
            }
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
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
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
                    return Ok(m);
                }
                return self.control.read_shutdown();
            }
        }
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        self.control.bye()
    }
}
