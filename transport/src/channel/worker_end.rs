//! The worker end of the TCP channel: a blocking connection that performs the handshake and reads
//! and writes whole frames. The TCP link moves data over it; the RDMA link keeps it for control
//! and liveness.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::auth::Secret;
use crate::protocol::{
    self, control_frame, FrameKind, Header, Hello, Parts, ProtocolError, PushClock, Welcome,
    HEADER_LEN,
};
use crate::protocol::{CHALLENGE_LEN, NONCE_LEN};
use crate::{Incoming, LinkError, PeerError};

/// A worker's connection to the server, past the handshake.
#[derive(Debug)]
pub struct WorkerEnd {
    stream: TcpStream,
    peer: String,
    parts: Parts,
    push_clock: PushClock,
}

impl WorkerEnd {
    /// Connects to `addr` and performs the handshake described by `hello`; the server's welcome
    /// says how the tensors are cut into parts. With `secret`, worker and server first prove to
    /// each other that they know it ([`crate::auth`]).
    ///
    /// Retries refused or unreachable connections until `wait` has passed, so workers may start
    /// before the server (as they do under Slurm). A refusal by the server is final.
    pub fn connect(
        addr: &str,
        hello: &Hello,
        wait: Duration,
        secret: Option<&Secret>,
    ) -> Result<Self, LinkError> {
        let deadline = Instant::now() + wait;
        // Retries back off from 50 ms to 2 s: a restarting server is not hammered.
        let mut pause = Duration::from_millis(50);
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
                Err(_) => {
                    std::thread::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        stream.set_nodelay(true).map_err(|source| PeerError::Io {
            op: "setsockopt(TCP_NODELAY)",
            peer: peer.clone(),
            source,
        })?;
        let dims: Vec<usize> = hello.dims.iter().map(|&d| d as usize).collect();
        let mut end = Self {
            stream,
            peer,
            // Replaced by the welcome's partition size below.
            parts: Parts::new(&dims, protocol::MAX_PART_BYTES).map_err(|e| LinkError::Refused {
                peer: addr.to_string(),
                reason: format!("this worker's tensors: {e}"),
            })?,
            push_clock: PushClock::default(),
        };
        let mut hello = hello.clone();
        if secret.is_some() {
            let n = crate::auth::nonce().map_err(|e| end.io_err("draw a nonce", e))?;
            hello.auth_nonce = Some(n);
        }
        let payload = hello.encode();
        end.write_all(
            &control_frame(FrameKind::Hello, 0, 0, &payload),
            "write hello",
        )?;
        let mut h = end.read_header("waiting for the handshake reply", false)?;
        let challenged = h.kind == FrameKind::Challenge;
        if let (true, Some(secret), Some(ours)) = (challenged, secret, hello.auth_nonce) {
            let mut b = [0u8; CHALLENGE_LEN];
            end.read_payload(&mut b, "read the challenge")?;
            let theirs: [u8; NONCE_LEN] = b[..NONCE_LEN].try_into().expect("NONCE_LEN bytes");
            if !secret.verify_server(&ours, &theirs, &payload, &b[NONCE_LEN..]) {
                let why = "authentication failed: the server's proof does not match this worker's secret (server and worker must use the same --secret-file, and this must be the job's server)";
                let _ = end.write_all(
                    &control_frame(FrameKind::Error, 0, 0, why.as_bytes()),
                    "write error",
                );
                return Err(LinkError::Refused {
                    peer: end.peer.clone(),
                    reason: why.into(),
                });
            }
            let proof = secret.worker_proof(&theirs, &ours, &payload);
            end.write_all(&control_frame(FrameKind::Auth, 0, 0, &proof), "write auth")?;
            h = end.read_header("waiting for the handshake reply", false)?;
        }
        match h.kind {
            FrameKind::Welcome if secret.is_some() && !challenged => Err(LinkError::Refused {
                peer: end.peer.clone(),
                reason: "the server welcomed this worker without proving it knows the job's secret: it is not this job's server".into(),
            }),
            FrameKind::Welcome => {
                let mut b = [0u8; Welcome::LEN];
                end.read_payload(&mut b, "read the welcome")?;
                let w = Welcome::decode(&b).map_err(|e| end.proto_err(e))?;
                end.parts =
                    Parts::new(&dims, w.part_bytes as usize).map_err(|e| end.proto_err(e))?;
                end.push_clock = w.push_clock;
                Ok(end)
            }
            FrameKind::Error => Err(end.read_error(&h)),
            kind => Err(end.proto_err(ProtocolError::Unexpected {
                kind,
                when: "instead of a handshake reply",
            })),
        }
    }

    /// The job's parts, as the server's welcome cut them.
    pub fn parts(&self) -> &Parts {
        &self.parts
    }

    /// What the clock of a push means on this job, as the welcome said.
    pub fn push_clock(&self) -> PushClock {
        self.push_clock
    }

    /// The server's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Whether the socket has something to read (or is closed) within `timeout`; `false` also
    /// when a signal interrupted the wait.
    pub fn readable(&self, timeout: Duration) -> Result<bool, LinkError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        // Rounded up, so that a short wait still waits; at most what poll(2) takes.
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
        let ms = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(self.io_err("waiting for the server", e.into())),
        }
    }

    /// The socket, for polling next to an RDMA completion channel.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
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

    /// Reads and checks a frame header; tensor frames are checked against the job's parts once
    /// `joined`.
    pub fn read_header(&mut self, op: &'static str, joined: bool) -> Result<Header, LinkError> {
        let mut b = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut b)
            .map_err(|e| self.io_err(op, e))?;
        let h = Header::decode(&b).map_err(|e| self.proto_err(e))?;
        protocol::check_len(&h, joined.then_some(&self.parts)).map_err(|e| self.proto_err(e))?;
        Ok(h)
    }

    /// Reads a payload (whose length the header gave) into `dst`.
    pub fn read_payload(&mut self, dst: &mut [u8], op: &'static str) -> Result<(), LinkError> {
        self.stream.read_exact(dst).map_err(|e| self.io_err(op, e))
    }

    /// Reads the text of an error frame and turns it into a refusal.
    pub fn read_error(&mut self, h: &Header) -> LinkError {
        let mut text = vec![0u8; h.len as usize];
        if let Err(e) = self.stream.read_exact(&mut text) {
            return self.io_err("read error frame", e);
        }
        LinkError::Refused {
            peer: self.peer.clone(),
            reason: String::from_utf8_lossy(&text).into_owned(),
        }
    }

    /// Writes all of `b`.
    pub fn write_all(&mut self, b: &[u8], op: &'static str) -> Result<(), LinkError> {
        self.stream.write_all(b).map_err(|e| self.io_err(op, e))
    }

    /// Writes all of `bufs` (a header and a payload, in one `writev` when the kernel takes it).
    pub fn write_vectored_all(
        &mut self,
        bufs: &mut [IoSlice<'_>],
        op: &'static str,
    ) -> Result<(), LinkError> {
        let mut bufs = bufs;
        while !bufs.is_empty() {
            match self.stream.write_vectored(bufs) {
                Ok(0) => return Err(self.io_err(op, io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(op, e)),
            }
        }
        Ok(())
    }

    /// Sends a control frame.
    pub fn send_control(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), LinkError> {
        self.write_all(&control_frame(kind, 0, 0, payload), "write control frame")
    }

    /// Reads the next frame, expecting a control frame of `kind`; returns its payload. An error
    /// frame becomes a refusal.
    pub fn read_control(&mut self, kind: FrameKind) -> Result<Vec<u8>, LinkError> {
        let h = self.read_header("waiting for a control frame", true)?;
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
        self.read_payload(&mut payload, "read control frame")?;
        Ok(payload)
    }

    /// Reads a frame arriving on the control connection while data moves elsewhere: only a
    /// goodbye or an error may come.
    pub fn read_shutdown(&mut self) -> Result<Incoming, LinkError> {
        let h = self.read_header("reading the control connection", true)?;
        match h.kind {
            FrameKind::Bye => Ok(Incoming::Shutdown),
            FrameKind::Error => Err(self.read_error(&h)),
            kind => Err(self.proto_err(ProtocolError::Unexpected {
                kind,
                when: "on the control connection of an RDMA worker",
            })),
        }
    }

    /// An unexpected frame, as an error.
    pub fn unexpected(&self, kind: FrameKind, when: &'static str) -> LinkError {
        self.proto_err(ProtocolError::Unexpected { kind, when })
    }

    /// Says goodbye and closes the sending half.
    pub fn bye(&mut self) -> Result<(), LinkError> {
        self.write_all(
            &Header::new(FrameKind::Bye, 0, 0, 0).encode(),
            "write goodbye",
        )?;
        let _ = self.stream.shutdown(Shutdown::Write);
        Ok(())
    }
}
