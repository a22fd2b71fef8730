//! The worker side of the TCP transport: after a blocking handshake, a non-blocking socket that
//! writes gradients from, and reads models straight into, per-tensor buffers it owns, moving both
//! directions at once (see [`pipeline`](super::pipeline)).

use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::pipeline::{Inbound, Outbound};
use crate::channel::WorkerEnd;
use crate::protocol::{FrameKind, Header, Hello, Parts};
use crate::spin::Spin;
use crate::{Clock, Incoming, Key, LinkError, PeerError, WorkerLink};

/// A worker's connection to the server over TCP.
#[derive(Debug)]
pub struct TcpClient {
    end: WorkerEnd,
    grads: Vec<Vec<f32>>,
    models: Vec<Vec<f32>>,
    out: Outbound,
    inb: Inbound,
    /// Frames read but not yet handed to the caller.
    ready: VecDeque<Incoming>,
    /// How long a wait polls the socket before sleeping in `poll(2)`.
    spin: Spin,
}

impl TcpClient {
    /// Connects to `addr` and performs the handshake described by `hello` (see
    /// [`WorkerEnd::connect`]).
    pub fn connect(
        addr: &str,
        hello: &Hello,
        wait: Duration,
        secret: Option<&crate::auth::Secret>,
    ) -> Result<Self, LinkError> {
        Self::over(WorkerEnd::connect(addr, hello, wait, secret)?)
    }

    /// A TCP link over an established channel (the socket becomes non-blocking).
    pub fn over(end: WorkerEnd) -> Result<Self, LinkError> {
        end.stream()
            .set_nonblocking(true)
            .map_err(|source| PeerError::Io {
                op: "fcntl(O_NONBLOCK)",
                peer: end.peer().to_string(),
                source,
            })?;
        let dims = end.parts().dims();
        Ok(Self {
            grads: dims.iter().map(|&d| vec![0.0; d]).collect(),
            models: dims.iter().map(|&d| vec![0.0; d]).collect(),
            out: Outbound::default(),
            inb: Inbound::default(),
            ready: VecDeque::new(),
            spin: Spin::new(crate::default_spin()),
            end,
        })
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> LinkError {
        PeerError::Io {
            op,
            peer: self.end.peer().to_string(),
            source,
        }
        .into()
    }

    /// Writes what the socket takes of the queued pushes, then reads whatever has come in.
    fn pump(&mut self) -> Result<(), LinkError> {
        let stream = self.end.stream();
        let parts = self.end.parts();
        let written = match self.out.is_empty() {
            true => Ok(true),
            false => self.out.write(stream, &self.grads, parts),
        };
        // Read even after a failed write: a server that dropped this worker said why before
        // closing, and its words beat the broken pipe.
        let peer = self.end.peer();
        self.inb
            .read(stream, &mut self.models, parts, &mut self.ready, peer)?;
        written
            .map(|_| ())
            .map_err(|e| self.io_err("write push", e))
    }

    /// Sleeps until the socket is readable (or writable, while pushes wait or `write`), at most
    /// `timeout`; `false` when the time passed or a signal came.
    fn sleep(&self, write: bool, timeout: Option<Duration>) -> Result<bool, LinkError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut flags = PollFlags::POLLIN;
        if write || !self.out.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(self.end.stream().as_fd(), flags)];
        let timeout = match timeout {
            // Rounded up, so that a short wait still waits; at most what poll(2) takes.
            Some(t) => {
                let ms = t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        match poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(self.io_err("waiting for the server", e.into())),
        }
    }

    /// Writes everything queued, waiting for the socket as needed (reading meanwhile, so the
    /// server's replies never back up behind this worker's pushes).
    fn drain(&mut self) -> Result<(), LinkError> {
        loop {
            self.pump()?;
            if self.out.is_empty() {
                return Ok(());
            }
            self.sleep(true, None)?;
        }
    }
}

impl WorkerLink for TcpClient {
    fn parts(&self) -> &Parts {
        self.end.parts()
    }

    fn push_clock(&self) -> crate::protocol::PushClock {
        self.end.push_clock()
    }

    fn tensor(&mut self, t: usize) -> (&[f32], &mut [f32]) {
        (&self.models[t], &mut self.grads[t])
    }

    fn model(&self, t: usize) -> &[f32] {
        &self.models[t]
    }

    fn push(&mut self, key: Key, clock: Clock) -> Result<(), LinkError> {
        self.out.push(self.end.parts(), key, clock);
        self.pump()
    }

    fn set_spin(&mut self, spin: Duration) {
        self.spin = Spin::new(spin);
    }

    fn wait_model_for(&mut self, timeout: Option<Duration>) -> Result<Option<Incoming>, LinkError> {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        let spin_until = self.spin.until(start);
        loop {
            if let Some(m) = self.ready.pop_front() {
                self.spin.answered_after(start.elapsed());
                return Ok(Some(m));
            }
            self.pump()?;
            if let Some(m) = self.ready.pop_front() {
                self.spin.answered_after(start.elapsed());
                return Ok(Some(m));
            }
            if self.inb.said_goodbye() {
                // Handed out once already; nothing more will come.
                return Ok(Some(Incoming::Shutdown));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.spin.answered_after(now - start);
                return Ok(None);
            }
            if now < spin_until {
                std::hint::spin_loop();
                continue;
            }
            // Nothing came in the time given, or a signal did: let the caller look at it.
            if !self.sleep(false, deadline.map(|d| d - now))? && timeout.is_some() {
                return Ok(None);
            }
        }
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        self.drain()
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        if self.inb.said_goodbye() {
            // The run is over: nobody reads pushes still queued.
            self.out.clear();
        }
        self.drain()?;
        let hdr = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        let mut sent = 0;
        while sent < hdr.len() {
            match std::io::Write::write(&mut self.end.stream(), &hdr[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.sleep(true, None)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("write goodbye", e)),
            }
        }
        let _ = self.end.stream().shutdown(Shutdown::Write);
        Ok(())
    }
}
