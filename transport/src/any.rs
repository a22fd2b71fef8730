//! Transport selection: `auto` (RDMA when both sides have it, TCP otherwise), `rdma` (required)
//! or `tcp`, for the server ([`AnyServer`]) and the worker ([`AnyLink`]), each reporting in one
//! line what it chose and why.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::channel::{ListenConfig, WorkerEnd};
use crate::protocol::{Hello, Parts};
use crate::tcp::{TcpClient, TcpServer};
use crate::{
    Arena, Clock, Event, Incoming, Key, LinkError, Rank, Transport, TransportError, Version,
    WorkerLink,
};

#[cfg(feature = "rdma")]
use crate::rdma::{RdmaClient, RdmaServer};

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// RDMA when this side has an active device (and, for a worker, the server offers it);
    /// TCP otherwise.
    #[default]
    Auto,
    /// RDMA or a clear error.
    Rdma,
    /// TCP only.
    Tcp,
}

/// The device and GID index for RDMA (`None`: the first device; the RoCE v2 IPv4 GID).
#[derive(Debug, Clone, Default)]
pub struct RdmaSelect {
    /// Device name, e.g. `mlx5_0`.
    pub device: Option<String>,
    /// GID index.
    pub gid_index: Option<u8>,
}

#[cfg(feature = "rdma")]
fn rdma_config(s: &RdmaSelect) -> crate::rdma::RdmaConfig {
    crate::rdma::RdmaConfig {
        device: s.device.clone(),
        gid_index: s.gid_index,
    }
}

/// The server's transport, whichever was chosen.
#[derive(Debug)]
// One per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyServer {
    /// Epoll TCP.
    Tcp(TcpServer),
    /// RDMA verbs (with TCP for control, and for workers without RDMA).
    #[cfg(feature = "rdma")]
    Rdma(RdmaServer),
}

impl AnyServer {
    /// Binds the chosen transport; returns it and a line saying what was chosen and why. RDMA
    /// registers `arena`, which must outlive the transport.
    pub fn bind(
        cfg: &ListenConfig,
        arena: &mut Arena,
        choice: Choice,
        rdma: &RdmaSelect,
    ) -> Result<(AnyServer, String), TransportError> {
        match choice {
            Choice::Tcp => Ok((
                AnyServer::Tcp(TcpServer::bind(cfg)?),
                "tcp (--transport tcp)".into(),
            )),
            #[cfg(feature = "rdma")]
            Choice::Rdma | Choice::Auto => match RdmaServer::bind(cfg, arena, &rdma_config(rdma)) {
                Ok(s) => {
                    let why = format!("rdma on {} (tcp for workers without RDMA)", s.describe());
                    Ok((AnyServer::Rdma(s), why))
                }
                Err(TransportError::Rdma(e)) if choice == Choice::Auto => Ok((
                    AnyServer::Tcp(TcpServer::bind(cfg)?),
                    format!("tcp, because {e}"),
                )),
                Err(e) => Err(e),
            },
            #[cfg(not(feature = "rdma"))]
            Choice::Rdma => {
                let _ = (rdma, arena);
                Err(TransportError::NoRdmaSupport)
            }
            #[cfg(not(feature = "rdma"))]
            Choice::Auto => Ok((
                AnyServer::Tcp(TcpServer::bind(cfg)?),
                "tcp (built without RDMA)".into(),
            )),
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        match self {
            AnyServer::Tcp(t) => t.local_addr(),
            #[cfg(feature = "rdma")]
            AnyServer::Rdma(r) => r.local_addr(),
        }
    }

    fn inner(&mut self) -> &mut dyn Transport {
        match self {
            AnyServer::Tcp(t) => t,
            #[cfg(feature = "rdma")]
            AnyServer::Rdma(r) => r,
        }
    }
}

impl Transport for AnyServer {
    fn poll(
        &mut self,
        arena: &mut Arena,
        events: &mut Vec<Event>,
        deadline: Option<Instant>,
    ) -> Result<(), TransportError> {
        self.inner().poll(arena, events, deadline)
    }

    fn send_model(&mut self, arena: &mut Arena, rank: Rank, key: Key) {
        self.inner().send_model(arena, rank, key)
    }

    fn release(&mut self, arena: &mut Arena, key: Key, version: Version) {
        self.inner().release(arena, key, version)
    }

    fn disconnect(&mut self, arena: &mut Arena, rank: Rank, why: &str) {
        self.inner().disconnect(arena, rank, why)
    }

    fn shutdown(&mut self, arena: &mut Arena, grace: Duration) {
        self.inner().shutdown(arena, grace)
    }

    fn answer_status(&mut self, arena: &mut Arena, request: u64, report: &[u8]) {
        self.inner().answer_status(arena, request, report)
    }

    fn peer(&self, rank: Rank) -> Option<crate::PeerInfo> {
        match self {
            AnyServer::Tcp(t) => t.peer(rank),
            #[cfg(feature = "rdma")]
            AnyServer::Rdma(r) => r.peer(rank),
        }
    }
}

/// A worker's link, whichever transport was chosen.
#[derive(Debug)]
pub enum AnyLink {
    /// TCP for everything.
    Tcp(Box<TcpClient>),
    /// RDMA for data, TCP for control.
    #[cfg(feature = "rdma")]
    Rdma(Box<RdmaClient>),
}

impl AnyLink {
    /// Connects, performs the handshake, and upgrades to RDMA as `choice` says; returns the link
    /// and a line saying which transport it uses and why. With `secret`, worker and server
    /// authenticate each other first.
    pub fn connect(
        addr: &str,
        hello: &Hello,
        wait: Duration,
        choice: Choice,
        rdma: &RdmaSelect,
        secret: Option<&crate::auth::Secret>,
    ) -> Result<(AnyLink, String), LinkError> {
        #[cfg(feature = "rdma")]
        let local = match choice {
            Choice::Tcp => None,
            _ => match crate::rdma::Local::open(&rdma_config(rdma)) {
                Ok(l) => Some(l),
                Err(e) if choice == Choice::Auto => {
                    let tcp = TcpClient::connect(addr, hello, wait, secret)?;
                    return Ok((AnyLink::Tcp(Box::new(tcp)), format!("tcp, because {e}")));
                }
                Err(e) => return Err(e.into()),
            },
        };
        #[cfg(feature = "rdma")]
        let hello = &Hello {
            rdma: local.is_some(),
            ..hello.clone()
        };
        let end = WorkerEnd::connect(addr, hello, wait, secret)?;
        #[cfg(feature = "rdma")]
        if let Some(local) = local {
            let device = local.describe();
            return match RdmaClient::upgrade(end, local)? {
                crate::rdma::Upgrade::Rdma(c) => {
                    Ok((AnyLink::Rdma(c), format!("rdma on {device}")))
                }
                crate::rdma::Upgrade::Declined(end, why) if choice == Choice::Auto => Ok((
                    AnyLink::Tcp(Box::new(TcpClient::over(end)?)),
                    format!("tcp, because {why}"),
                )),
                crate::rdma::Upgrade::Declined(_, why) => Err(LinkError::NoRdma(why)),
            };
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = rdma;
            if choice == Choice::Rdma {
                return Err(LinkError::NoRdma(
                    "this hetsync was built without RDMA support".into(),
                ));
            }
        }
        Ok((
            AnyLink::Tcp(Box::new(TcpClient::over(end)?)),
            "tcp (--transport tcp)".into(),
        ))
    }

    fn inner(&mut self) -> &mut dyn WorkerLink {
        match self {
            AnyLink::Tcp(t) => t.as_mut(),
            #[cfg(feature = "rdma")]
            AnyLink::Rdma(r) => r.as_mut(),
        }
    }
}

impl WorkerLink for AnyLink {
    fn parts(&self) -> &Parts {
        match self {
            AnyLink::Tcp(t) => t.parts(),
            #[cfg(feature = "rdma")]
            AnyLink::Rdma(r) => r.parts(),
        }
    }

    fn push_clock(&self) -> crate::protocol::PushClock {
        match self {
            AnyLink::Tcp(t) => t.push_clock(),
            #[cfg(feature = "rdma")]
            AnyLink::Rdma(r) => r.push_clock(),
        }
    }

    fn tensor(&mut self, t: usize) -> (&[f32], &mut [f32]) {
        self.inner().tensor(t)
    }

    fn model(&self, t: usize) -> &[f32] {
        match self {
            AnyLink::Tcp(l) => l.model(t),
            #[cfg(feature = "rdma")]
            AnyLink::Rdma(r) => r.model(t),
        }
    }

    fn part(&mut self, key: Key) -> (&[f32], &mut [f32]) {
        self.inner().part(key)
    }

    fn push(&mut self, key: Key, clock: Clock) -> Result<(), LinkError> {
        self.inner().push(key, clock)
    }

    fn set_spin(&mut self, spin: Duration) {
        self.inner().set_spin(spin)
    }

    fn flush(&mut self) -> Result<(), LinkError> {
        self.inner().flush()
    }

    fn wait_model_for(&mut self, timeout: Option<Duration>) -> Result<Option<Incoming>, LinkError> {
        self.inner().wait_model_for(timeout)
    }

    fn bye(&mut self) -> Result<(), LinkError> {
        self.inner().bye()
    }
}
