//! Push+pull round trips of one tensor, timed: through Het-Sync (a server on a thread of this
//! process, one worker on the calling thread) and through the bare references it is held
//! against (a blocking TCP echo of the same bytes; on RDMA, a verbs ping-pong). The transport
//! benchmarks, `hetsync bench transport` and criterion's `transport` group, measure these.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hetsync_transport::any::{Choice, RdmaSelect};

use crate::client::{Client, ConnectOptions, LinkError, Status};
use crate::server::{Server, ServerConfig, ServerError};
use crate::sync::SyncMode;

/// Why a round trip could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum RoundTripError {
    /// The in-process server.
    #[error("the benchmark's server: {0}")]
    Server(#[from] ServerError),
    /// The worker's link.
    #[error("the benchmark's worker: {0}")]
    Link(#[from] LinkError),
    /// The raw socket echo.
    #[error("the raw TCP echo: {op}: {source}")]
    Raw {
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The raw verbs ping-pong.
    #[error("the raw RDMA ping-pong: {0}")]
    RawRdma(#[source] LinkError),
    /// The server ended the run early.
    #[error("the benchmark's server said goodbye in the middle of the run")]
    Ended,
}

/// Something that does one push+pull round of a fixed number of bytes.
pub trait RoundTrip {
    /// One round: the bytes go there and come back.
    fn round(&mut self) -> Result<(), RoundTripError>;
}

/// A Het-Sync server for one worker on a thread, and that worker.
#[derive(Debug)]
pub struct HetSync {
    client: Option<Client>,
    server: Option<JoinHandle<Result<(), ServerError>>>,
    stop: Arc<AtomicBool>,
    transport: String,
}

impl HetSync {
    /// Starts a server for one tensor of `bytes` (a multiple of 4) on loopback over `transport`,
    /// naive policy, and connects its worker. `partition` overrides the server's partition
    /// size; `spin` is the wait's spin on both sides.
    pub fn start(
        bytes: usize,
        transport: Choice,
        rdma: &RdmaSelect,
        partition: Option<usize>,
        spin: Duration,
    ) -> Result<Self, RoundTripError> {
        let dims = vec![(bytes / 4).max(1)];
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("an address"), 1, dims);
        cfg.mode = SyncMode::NAIVE;
        cfg.transport = transport;
        cfg.rdma = rdma.clone();
        cfg.spin = spin;
        if let Some(p) = partition {
            cfg.partition_bytes = p;
        }
        let (server, _) = Server::bind(cfg.clone())?;
        let addr = server.local_addr().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let server = std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || server.run(&flag).map(|_| ()))
            .map_err(|source| RoundTripError::Raw {
                op: "spawn the server thread",
                source,
            })?;
        let mut opts = ConnectOptions::new(&addr, 0, cfg.dims);
        opts.transport = transport;
        opts.rdma = rdma.clone();
        opts.spin = spin;
        opts.connect_wait = Duration::from_secs(10);
        let mut me = Self {
            client: None,
            server: Some(server),
            stop,
            transport: String::new(),
        };
        let mut client = match Client::connect(&opts) {
            Ok(c) => c,
            // A server that failed says why better than the refused connection does.
            Err(e) => return Err(me.server_failure().unwrap_or(e.into())),
        };
        me.transport = client.transport().to_string();
        if client.wait_all()? == Status::Shutdown {
            return Err(RoundTripError::Ended);
        }
        me.client = Some(client);
        Ok(me)
    }

    /// The server thread's error, if it has ended with one.
    fn server_failure(&mut self) -> Option<RoundTripError> {
        if !self.server.as_ref()?.is_finished() {
            return None;
        }
        match self.server.take()?.join() {
            Ok(Err(e)) => Some(e.into()),
            _ => None,
        }
    }

    /// Which transport the worker ended up on, and why.
    pub fn transport(&self) -> &str {
        &self.transport
    }
}

impl RoundTrip for HetSync {
    fn round(&mut self) -> Result<(), RoundTripError> {
        let client = self.client.as_mut().expect("connected until dropped");
        match client.step()? {
            Status::Ready => Ok(()),
            Status::Shutdown => Err(RoundTripError::Ended),
        }
    }
}

impl Drop for HetSync {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.bye();
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
    }
}

/// A blocking TCP echo over loopback with TCP_NODELAY: send `bytes`, receive them back; the
/// echo is a thread that reads them whole, then writes them back.
#[derive(Debug)]
pub struct RawTcp {
    stream: TcpStream,
    buf: Vec<u8>,
    echo: Option<JoinHandle<()>>,
}

impl RawTcp {
    /// Starts the echo and connects to it.
    pub fn start(bytes: usize) -> Result<Self, RoundTripError> {
        let raw = |op| move |source| RoundTripError::Raw { op, source };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(raw("bind"))?;
        let addr = listener.local_addr().map_err(raw("getsockname"))?;
        // Connected before the echo starts (the kernel completes the handshake into the
        // listener's backlog), so a failure here leaves no thread waiting in accept.
        let stream = TcpStream::connect(addr).map_err(raw("connect"))?;
        stream.set_nodelay(true).map_err(raw("TCP_NODELAY"))?;
        let echo = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; bytes];
                while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
            })
            .map_err(raw("spawn the echo thread"))?;
        Ok(Self {
            stream,
            buf: vec![1u8; bytes],
            echo: Some(echo),
        })
    }
}

impl RoundTrip for RawTcp {
    fn round(&mut self) -> Result<(), RoundTripError> {
        let raw = |op| move |source| RoundTripError::Raw { op, source };
        self.stream.write_all(&self.buf).map_err(raw("write"))?;
        self.stream.read_exact(&mut self.buf).map_err(raw("read"))
    }
}

impl Drop for RawTcp {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(e) = self.echo.take() {
            let _ = e.join();
        }
    }
}

/// The verbs ping-pong ([`hetsync_transport::rdma::pingpong`]).
#[cfg(feature = "rdma")]
#[derive(Debug)]
pub struct RawRdma(hetsync_transport::rdma::pingpong::PingPong);

#[cfg(feature = "rdma")]
impl RawRdma {
    /// Connects two queue pairs on the device `rdma` selects.
    pub fn start(bytes: usize, rdma: &RdmaSelect) -> Result<Self, RoundTripError> {
        let cfg = hetsync_transport::rdma::RdmaConfig {
            device: rdma.device.clone(),
            gid_index: rdma.gid_index,
        };
        let pp = hetsync_transport::rdma::pingpong::PingPong::new(&cfg, bytes)
            .map_err(RoundTripError::RawRdma)?;
        Ok(Self(pp))
    }
}

#[cfg(feature = "rdma")]
impl RoundTrip for RawRdma {
    fn round(&mut self) -> Result<(), RoundTripError> {
        self.0.round().map_err(RoundTripError::RawRdma)
    }
}

/// Round times of one measurement.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Each round's duration, in seconds, sorted.
    pub secs: Vec<f64>,
}

impl Samples {
    /// Adds the rounds of `other`.
    pub fn merge(&mut self, other: Samples) {
        self.secs.extend(other.secs);
        self.secs.sort_by(f64::total_cmp);
    }

    /// The `q` quantile (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.secs.is_empty() {
            return f64::NAN;
        }
        let i = ((self.secs.len() - 1) as f64 * q).round() as usize;
        self.secs[i] * 1e6
    }

    /// Bytes per second for rounds of `bytes`, from the mean round time, in GB/s.
    pub fn gbps(&self, bytes: usize) -> f64 {
        let total: f64 = self.secs.iter().sum();
        bytes as f64 * self.secs.len() as f64 / total / 1e9
    }
}

/// Runs `warmup` rounds, then times rounds one by one until `time` has passed and at least
/// `min_rounds` were done (at most `max_rounds`).
pub fn measure(
    rt: &mut dyn RoundTrip,
    warmup: usize,
    time: Duration,
    min_rounds: usize,
    max_rounds: usize,
) -> Result<Samples, RoundTripError> {
    for _ in 0..warmup {
        rt.round()?;
    }
    let start = Instant::now();
    let mut secs = Vec::new();
    while secs.len() < max_rounds && (secs.len() < min_rounds || start.elapsed() < time) {
        let t = Instant::now();
        rt.round()?;
        secs.push(t.elapsed().as_secs_f64());
    }
    secs.sort_by(f64::total_cmp);
    Ok(Samples { secs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hetsync_and_the_raw_echo_complete_rounds_and_quantiles_are_ordered() {
        let mut hs = HetSync::start(
            64 * 1024,
            Choice::Tcp,
            &RdmaSelect::default(),
            Some(16 * 1024),
            Duration::ZERO,
        )
        .unwrap();
        assert!(hs.transport().starts_with("tcp"), "{}", hs.transport());
        let s = measure(&mut hs, 2, Duration::ZERO, 20, 20).unwrap();
        assert_eq!(s.secs.len(), 20);
        assert!(s.quantile_us(0.5) <= s.quantile_us(0.99));
        assert!(s.gbps(64 * 1024) > 0.0);
        let mut raw = RawTcp::start(64 * 1024).unwrap();
        let r = measure(&mut raw, 1, Duration::ZERO, 5, 5).unwrap();
        assert_eq!(r.secs.len(), 5);
    }
}
