//! The worker side of the TCP transport: a blocking connection that writes gradients from, and
//! reads models straight into, per-tensor buffers it owns.

use std::io::IoSlice;
use std::time::Duration;

use crate::channel::WorkerEnd;
use crate::protocol::{FrameKind, Header, Hello, Parts};
use crate::{Clock, Incoming, Key, LinkError, WorkerLink};

/// A worker's connection to the server over TCP.
#[derive(Debug)]
pub struct TcpClient {
    end: WorkerEnd,
    grads: Vec<Vec<f32>>,
    models: Vec<Vec<f32>>,
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
        Ok(Self::over(WorkerEnd::connect(addr, hello, wait, secret)?))
    }

    /// A TCP link over an established channel.
    pub fn over(end: WorkerEnd) -> Self {
        let dims = end.parts().dims();
        Self {
            grads: dims.iter().map(|&d| vec![0.0; d]).collect(),
            models: dims.iter().map(|&d| vec![0.0; d]).collect(),
            end,
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
        let part = self.end.parts()[key];
        let body: &[u8] = bytemuck::cast_slice(&self.grads[part.tensor as usize][part.elems()]);
        let hdr = Header::new(FrameKind::Push, key, clock, body.len() as u64).encode();
        self.end
            .write_vectored_all(&mut [IoSlice::new(&hdr), IoSlice::new(body)], "write push")
    }

    fn wait_model_for(&mut self, timeout: Option<Duration>) -> Result<Option<Incoming>, LinkError> {
        if let Some(t) = timeout {
            if !self.end.readable(t)? {
                return Ok(None);
            }
        }
        self.read_model().map(Some)
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        self.end.bye()
    }
}

impl TcpClient {
    /// Reads the next frame from the server: a part's model or its goodbye.
    fn read_model(&mut self) -> Result<Incoming, LinkError> {
        let h = self.end.read_header("waiting for the model", true)?;
        match h.kind {
            FrameKind::Model => {
                let part = self.end.parts()[h.key];
                let model = &mut self.models[part.tensor as usize][part.elems()];
                self.end
                    .read_payload(bytemuck::cast_slice_mut(model), "read model")?;
                Ok(Incoming::Model {
                    key: h.key,
                    round: h.clock,
                })
            }
            FrameKind::Bye => Ok(Incoming::Shutdown),
            FrameKind::Error => Err(self.end.read_error(&h)),
            kind => Err(self
                .end
                .unexpected(kind, "from the server while waiting for a model")),
        }
    }
}
