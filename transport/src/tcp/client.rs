//! The worker side of the TCP transport: a blocking connection that writes gradients from, and
//! reads models straight into, buffers it owns.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::protocol::{self, FrameKind, Header, Hello, Limits, ProtocolError, HEADER_LEN};
use crate::{Incoming, LinkError, PeerError, WorkerLink};

/// A worker's connection to the server over TCP.
#[derive(Debug)]
pub struct TcpClient {
    stream: TcpStream,
    peer: String,
    limits: Limits,
    grads: Vec<Vec<f32>>,
    models: Vec<Vec<f32>>,
}

impl TcpClient {
    /// Connects to `addr` and performs the handshake described by `hello`.
    ///
    /// Retries refused or unreachable connections until `wait` has passed, so workers may start
    /// before the server (as they do under Slurm). A refusal by the server is final.
    pub fn connect(addr: &str, hello: &Hello, wait: Duration) -> Result<Self, LinkError> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .and_then(|mut addrs| {
                    addrs.next().ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "name resolved to no address")
                    })
                })
                .and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(5)));
            match attempt {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    let hint = match e.kind() {
                        io::ErrorKind::ConnectionRefused => {
                            " (is `hetsync server` running and listening on that address and port?)"
                        }
                        io::ErrorKind::NotFound => " (check the host name in --server HOST:PORT)",
                        _ => "",
                    };
                    return Err(LinkError::Connect {
                        addr: addr.to_string(),
                        source: e,
                        hint,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        let io_err = |op, source| PeerError::Io {
            op,
            peer: peer.clone(),
            source,
        };
        stream
            .set_nodelay(true)
            .map_err(|e| io_err("setsockopt(TCP_NODELAY)", e))?;
        let dims: Vec<usize> = hello.dims.iter().map(|&d| d as usize).collect();
        let mut client = Self {
            stream,
            peer,
            grads: dims.iter().map(|&d| vec![0.0; d]).collect(),
            models: dims.iter().map(|&d| vec![0.0; d]).collect(),
            limits: Limits { dims },
        };
        let frame = protocol::control_frame(FrameKind::Hello, 0, 0, &hello.encode());
        client
            .stream
            .write_all(&frame)
            .map_err(|e| client.io_err("write hello", e))?;
        let h = client.read_header("waiting for the handshake reply")?;
        match h.kind {
            FrameKind::Welcome => Ok(client),
            FrameKind::Error => Err(client.read_error(&h)),
            kind => Err(client.proto_err(ProtocolError::Unexpected {
                kind,
                when: "instead of a handshake reply",
            })),
        }
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> LinkError {
        let peer = self.peer.clone();
        if source.kind() == io::ErrorKind::UnexpectedEof {
            return PeerError::Closed {
                peer,
                when: "without saying goodbye",
            }
            .into();
        }
        PeerError::Io { op, peer, source }.into()
    }

    fn proto_err(&self, source: ProtocolError) -> LinkError {
        PeerError::Protocol {
            peer: self.peer.clone(),
            source,
        }
        .into()
    }

    fn read_header(&mut self, op: &'static str) -> Result<Header, LinkError> {
        let mut b = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut b)
            .map_err(|e| self.io_err(op, e))?;
        let h = Header::decode(&b).map_err(|e| self.proto_err(e))?;
        self.limits.check(&h).map_err(|e| self.proto_err(e))?;
        Ok(h)
    }

    /// Reads the text of an error frame and turns it into a refusal.
    fn read_error(&mut self, h: &Header) -> LinkError {
        let mut text = vec![0u8; h.len as usize];
        if let Err(e) = self.stream.read_exact(&mut text) {
            return self.io_err("read error frame", e);
        }
        LinkError::Refused {
            peer: self.peer.clone(),
            reason: String::from_utf8_lossy(&text).into_owned(),
        }
    }
}

/// The control-connection side of the RDMA link.
#[cfg(feature = "rdma")]
impl TcpClient {
    /// Sends a control frame (RDMA negotiation).
    pub(crate) fn send_control(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        let frame = protocol::control_frame(kind, 0, 0, payload);
        self.stream
            .write_all(&frame)
            .map_err(|e| self.io_err("write control frame", e))
    }

    /// Reads the next frame, expecting a control frame of `kind`; returns its payload. An error
    /// frame becomes a refusal.
    pub(crate) fn read_control(&mut self, kind: FrameKind) -> Result<Vec<u8>, LinkError> {
        let h = self.read_header("waiting for a control frame")?;
        if h.kind == FrameKind::Error {
            return Err(self.read_error(&h));
        }
        if h.kind != kind {
            return Err(self.proto_err(ProtocolError::Unexpected {
                kind: h.kind,
                when: "instead of the RDMA reply",
            }));
        }
        let mut payload = vec![0u8; h.len as usize];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| self.io_err("read control frame", e))?;
        Ok(payload)
    }

    /// Reads a frame arriving on the control connection while the data moves over RDMA: only a
    /// goodbye or an error may come.
    pub(crate) fn read_shutdown(&mut self) -> Result<Incoming, LinkError> {
        let h = self.read_header("reading the control connection")?;
        match h.kind {
            FrameKind::Bye => Ok(Incoming::Shutdown),
            FrameKind::Error => Err(self.read_error(&h)),
            kind => Err(self.proto_err(ProtocolError::Unexpected {
                kind,
                when: "on the control connection of an RDMA worker",
            })),
        }
    }

    /// The socket, for polling next to the completion channel.
    pub(crate) fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The server's address.
    pub(crate) fn peer(&self) -> &str {
        &self.peer
    }
}

impl WorkerLink for TcpClient {
    fn model_and_gradient(&mut self, key: u32) -> (&[f32], &mut [f32]) {
        (&self.models[key as usize], &mut self.grads[key as usize])
    }

    fn model(&self, key: u32) -> &[f32] {
        &self.models[key as usize]
    }

    fn push(&mut self, key: u32, clock: u64) -> Result<(), LinkError> {
        let body: &[u8] = bytemuck::cast_slice(&self.grads[key as usize]);
        let hdr = Header::new(FrameKind::Push, key, clock, body.len() as u64).encode();
        let mut bufs = [IoSlice::new(&hdr), IoSlice::new(body)];
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            match self.stream.write_vectored(bufs) {
                Ok(0) => return Err(self.io_err("write push", io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("write push", e)),
            }
        }
        Ok(())
    }

    fn wait_model(&mut self) -> Result<Incoming, LinkError> {
        let h = self.read_header("waiting for the model")?;
        match h.kind {
            FrameKind::Model => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.models[h.key as usize]);
                if let Err(e) = self.stream.read_exact(dst) {
                    return Err(self.io_err("read model", e));
                }
                Ok(Incoming::Model {
                    key: h.key,
                    round: h.clock,
                })
            }
            FrameKind::Bye => Ok(Incoming::Shutdown),
            FrameKind::Error => Err(self.read_error(&h)),
            kind => Err(self.proto_err(ProtocolError::Unexpected {
                kind,
                when: "from the server while waiting for the model",
            })),
        }
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        let bye = Header::new(FrameKind::Bye, 0, 0, 0).encode();
        self.stream
            .write_all(&bye)
            .map_err(|e| self.io_err("write goodbye", e))?;
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}
