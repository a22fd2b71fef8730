//! The worker API: connect to a server, push a tensor's gradient, wait for its model, or do both
//! for every tensor at once, pipelined. The simulated worker, the benches and the Python binding
//! use it; the transport (RDMA or TCP) is chosen at connect time and invisible afterwards.
//!
//! The verbs are Angel's: [`push`](Client::push) (its `increment`), [`clock`](Client::clock)
//! (the end of an iteration) and [`wait`](Client::wait) (the read). Under a vector-clock policy
//! (BSP, SSP, ASP) a push carries this worker's clock on that key, the server applies it at
//! once, and the model it sends back is the read at the next clock, held by the server until the
//! slowest worker is within the staleness bound: `wait` blocks on the socket (or the completion
//! channel) without polling. A worker's clock on a key ticks at `clock()` if it pushed the key in
//! that iteration: a key it leaves out keeps its clock (and holds the other workers' reads of
//! that key back once they are the bound ahead). Under BSP, a worker that waits for one key
//! before pushing another that a second worker waits for first deadlocks them both; pushing
//! every key before waiting ([`step`](Client::step)) never does. Under a barrier policy a push
//! carries the round of the model it was computed on and the reply is the next round's model;
//! `clock` only counts.
//!
//! Each tensor (key) has a model buffer and a gradient buffer owned by the link (registered
//! memory on RDMA). A key's model may be read and its gradient written between
//! [`Client::wait`] and the next [`Client::push`] of that key; after the push and until the
//! wait returns, the NIC reads the one and the server writes the other (on RDMA, straight into
//! that memory), so the accessors panic then rather than hand out a slice.
//!
//! # Example
//!
//! A server for two workers in this process, and two workers each taking three steps on a model
//! of two tensors:
//!
//! ```
//! use std::sync::atomic::AtomicBool;
//! use hetsync::client::{Client, ConnectOptions, Status};
//! use hetsync::server::{Server, ServerConfig};
//! use hetsync::sync::SyncMode;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dims = vec![1000, 10];
//! let (server, _) = Server::bind(ServerConfig {
//!     mode: SyncMode::NAIVE,
//!     lr: 0.5,
//!     rounds: Some(3),
//!     ..ServerConfig::new("127.0.0.1:0".parse()?, 2, dims.clone())
//! })?;
//! let addr = server.local_addr().to_string();
//! let stop = AtomicBool::new(false);
//! std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     let server = s.spawn(|| server.run(&stop));
//!     let workers: Vec<_> = (0..2)
//!         .map(|rank| {
//!             let opts = ConnectOptions::new(&addr, rank, dims.clone());
//!             s.spawn(move || -> Result<Vec<f32>, hetsync::client::LinkError> {
//!                 let mut client = Client::connect(&opts)?;
//!                 client.wait_all()?; // the first model of every tensor
//!                 while client.round(0) < 3 {
//!                     for key in 0..client.dims().len() {
//!                         let (model, grad) = client.tensor(key);
//!                         for (g, m) in grad.iter_mut().zip(model) {
//!                             *g = m - 1.0; // the gradient of 0.5 |m - 1|^2
//!                         }
//!                     }
//!                     if client.step()? == Status::Shutdown {
//!                         break;
//!                     }
//!                 }
//!                 Ok(client.model(0).to_vec())
//!             })
//!         })
//!         .collect();
//!     for w in workers {
//!         let model = w.join().unwrap()?;
//!         // Three SGD steps at rate 0.5 from 0 towards 1: 1 - 0.5^3.
//!         assert!(model.iter().all(|&m| m == 0.875));
//!     }
//!     server.join().unwrap()?;
//!     Ok(())
//! }).map_err(|e| e.to_string())?;
//! # Ok(())
//! # }
//! ```

use std::ops::Range;
use std::time::{Duration, Instant};

use hetsync_transport::any::{AnyLink, Choice, RdmaSelect};
use hetsync_transport::auth::Secret;
use hetsync_transport::protocol::{Hello, PushClock};
use hetsync_transport::{Incoming, WorkerLink};

pub use hetsync_transport::LinkError;

use crate::{Clock, Rank};

/// How to reach the server and what this worker is.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The server's `HOST:PORT`.
    pub server: String,
    /// This worker's rank, `0..workers`.
    pub rank: Rank,
    /// Workers in the job, checked against the server's when not 0.
    pub workers: u32,
    /// Elements (f32) of each tensor, in key order; must match the server's.
    pub dims: Vec<usize>,
    /// How long to keep retrying while the server is not up yet.
    pub connect_wait: Duration,
    /// Which transport to use.
    pub transport: Choice,
    /// The RDMA device and GID index.
    pub rdma: RdmaSelect,
    /// The job's shared secret, when the server authenticates workers (`--secret-file`).
    pub secret: Option<Secret>,
    /// How long a wait for a model polls before it sleeps (zero never spins; see
    /// [`default_spin`](hetsync_transport::default_spin)).
    pub spin: Duration,
}

impl ConnectOptions {
    /// Options with the defaults: job size left to the server, 60 s of retries, `auto`
    /// transport on the first RDMA device.
    pub fn new(server: &str, rank: Rank, dims: Vec<usize>) -> Self {
        Self {
            server: server.to_string(),
            rank,
            workers: 0,
            dims,
            connect_wait: Duration::from_secs(60),
            transport: Choice::Auto,
            rdma: RdmaSelect::default(),
            secret: None,
            spin: hetsync_transport::default_spin(),
        }
    }
}

/// What a wait ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The models waited for are in.
    Ready,
    /// The server ended the run (said goodbye); nothing more will come.
    Shutdown,
}

/// A worker's connection to a Het-Sync server. See the [module documentation](self).
#[derive(Debug)]
pub struct Client {
    link: AnyLink,
    how: String,
    /// Round of the model each part holds.
    rounds: Vec<Clock>,
    /// Parts whose model is awaited (pushed and not answered, or never received).
    awaiting: Vec<bool>,
    /// Per tensor, how many of its parts are awaited.
    awaited: Vec<usize>,
    /// What a push's clock means on this job.
    push_clock: PushClock,
    /// This worker's clock: iterations completed ([`clock`](Self::clock) calls).
    clock: Clock,
    /// Per tensor, this worker's clock on it: the iterations in which it pushed it.
    key_clock: Vec<Clock>,
    /// Per tensor, whether it was pushed since the last `clock()`.
    touched: Vec<bool>,
    shutdown: bool,
}

impl Client {
    /// Connects and performs the handshake. The server sends every tensor's first model once
    /// all workers have joined: [`wait_all`](Self::wait_all) for it before the first push.
    pub fn connect(opts: &ConnectOptions) -> Result<Self, LinkError> {
        let hello = Hello {
            rank: opts.rank,
            workers: opts.workers,
            dims: opts.dims.iter().map(|&d| d as u64).collect(),
            rdma: false,
            auth_nonce: None,
        };
        let (mut link, how) = AnyLink::connect(
            &opts.server,
            &hello,
            opts.connect_wait,
            opts.transport,
            &opts.rdma,
            opts.secret.as_ref(),
        )?;
        link.set_spin(opts.spin);
        let parts = link.parts();
        let awaited = (0..parts.dims().len())
            .map(|t| parts.of_tensor(t).len())
            .collect();
        Ok(Self {
            rounds: vec![0; parts.len()],
            awaiting: vec![true; parts.len()],
            key_clock: vec![0; parts.dims().len()],
            touched: vec![false; parts.dims().len()],
            awaited,
            push_clock: link.push_clock(),
            clock: 0,
            shutdown: false,
            link,
            how,
        })
    }

    /// Which transport the link uses and why, in one line.
    pub fn transport(&self) -> &str {
        &self.how
    }

    /// Elements of each tensor.
    pub fn dims(&self) -> &[usize] {
        self.link.parts().dims()
    }

    /// Tensor `key`'s latest model.
    ///
    /// # Panics
    /// While the key's model is awaited (between [`push`](Self::push) and [`wait`](Self::wait)):
    /// the server is writing it then.
    pub fn model(&self, key: usize) -> &[f32] {
        self.check_idle(key);
        self.link.model(key)
    }

    /// Tensor `key`'s latest model and its gradient buffer, to compute the gradient in place.
    ///
    /// # Panics
    /// While the key's model is awaited: the link is still sending the gradient and the server
    /// writing the model.
    pub fn tensor(&mut self, key: usize) -> (&[f32], &mut [f32]) {
        self.check_idle(key);
        self.link.tensor(key)
    }

    fn check_idle(&self, key: usize) {
        if self.shutdown {
            return; // the server finished its writes before saying goodbye
        }
        assert_eq!(
            self.awaited[key], 0,
            "key {key}'s buffers are in use until its model comes back: wait({key}) first"
        );
    }

    /// Whether tensor `key`'s model is awaited: pushed (or never received) and not back yet.
    /// Its buffers may not be touched then ([`model`](Self::model) and
    /// [`tensor`](Self::tensor) panic).
    pub fn awaiting(&self, key: usize) -> bool {
        !self.shutdown && self.awaited[key] > 0
    }

    /// Whether tensor `key` was pushed since the last [`clock`](Self::clock): under a
    /// vector-clock policy it may not be pushed again before then.
    pub fn pushed(&self, key: usize) -> bool {
        self.touched[key]
    }

    /// Whether the server ended the run (said goodbye, or this worker left).
    pub fn finished(&self) -> bool {
        self.shutdown
    }

    /// The round of tensor `key`'s model: the oldest round among its parts.
    pub fn round(&self, key: usize) -> Clock {
        let parts = self.link.parts().of_tensor(key);
        parts.map(|p| self.rounds[p as usize]).min().unwrap_or(0)
    }

    /// This worker's clock: the iterations it has completed ([`clock`](Self::clock) calls).
    pub fn worker_clock(&self) -> Clock {
        self.clock
    }

    /// What a push's clock means on this job (the server's policy decides).
    pub fn push_clock(&self) -> PushClock {
        self.push_clock
    }

    /// Ends this worker's iteration (Angel's `clock`): its clock ticks, and so does its clock
    /// on every key it pushed since the last call. Under a vector-clock policy the server learnt
    /// each tick with the push; the reads that follow are at the new clock.
    pub fn clock(&mut self) {
        self.clock += 1;
        for (c, t) in self.key_clock.iter_mut().zip(&mut self.touched) {
            if std::mem::take(t) {
                *c += 1;
            }
        }
    }

    /// Pushes tensor `key`'s gradient buffer, part by part (Angel's `increment`), stamped with
    /// this worker's clock on the key (vector-clock policies) or the round of each part's model
    /// (barrier policies). Other keys may be pushed before waiting for this one. After the
    /// server ended the run it does nothing.
    ///
    /// # Panics
    /// If the key's model is still awaited (push only after [`wait`](Self::wait) for it), or,
    /// under a vector-clock policy, if the key was pushed already in this iteration (call
    /// [`clock`](Self::clock) between iterations).
    pub fn push(&mut self, key: usize) -> Result<(), LinkError> {
        if self.shutdown {
            return Ok(());
        }
        self.push_parts(key)?;
        // Whole on its way before returning, so computing the next key overlaps the server's
        // work on this one (over TCP the socket may not take a large tensor at once).
        self.link.flush()
    }

    /// Queues every part of tensor `key` (see [`push`](Self::push)), without waiting for the
    /// transport to take them.
    fn push_parts(&mut self, key: usize) -> Result<(), LinkError> {
        self.begin_push(key);
        for p in self.link.parts().of_tensor(key) {
            self.push_part(key, p)?;
        }
        Ok(())
    }

    /// Checks that tensor `key` may be pushed now and marks it pushed in this iteration.
    fn begin_push(&mut self, key: usize) {
        self.check_idle(key);
        if self.push_clock == PushClock::WorkerClock {
            assert!(
                !self.touched[key],
                "key {key} was pushed already in iteration {}: call clock() between iterations",
                self.clock
            );
        }
        self.touched[key] = true;
    }

    /// Pushes part `p` of tensor `key` (see [`push`](Self::push)).
    fn push_part(&mut self, key: usize, p: u32) -> Result<(), LinkError> {
        let stamp = match self.push_clock {
            PushClock::WorkerClock => self.key_clock[key],
            _ => self.rounds[p as usize],
        };
        self.link.push(p, stamp)?;
        self.awaiting[p as usize] = true;
        self.awaited[key] += 1;
        Ok(())
    }

    /// Waits until tensor `key`'s model has come back (every part of it): the read at this
    /// worker's clock, which under SSP waits for the slowest worker. Models of other keys that
    /// arrive meanwhile are taken too.
    pub fn wait(&mut self, key: usize) -> Result<Status, LinkError> {
        while self.awaited[key] > 0 {
            if self.receive()? == Status::Shutdown {
                return Ok(Status::Shutdown);
            }
        }
        Ok(Status::Ready)
    }

    /// Waits until every awaited model has come back.
    pub fn wait_all(&mut self) -> Result<Status, LinkError> {
        while self.awaited.iter().any(|&n| n > 0) {
            if self.receive()? == Status::Shutdown {
                return Ok(Status::Shutdown);
            }
        }
        Ok(Status::Ready)
    }

    /// Like [`wait`](Self::wait) (`key` given) or [`wait_all`](Self::wait_all) (`None`), for at
    /// most about `timeout`: `None` when the models are not all in by then, or a signal
    /// interrupted the wait. A caller that must react to signals (Python's Ctrl-C) waits in
    /// slices with it.
    pub fn wait_for(
        &mut self,
        key: Option<usize>,
        timeout: Duration,
    ) -> Result<Option<Status>, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = match key {
                Some(k) => self.awaited[k] > 0,
                None => self.awaited.iter().any(|&n| n > 0),
            };
            if !pending {
                return Ok(Some(Status::Ready));
            }
            if self.shutdown {
                return Ok(Some(Status::Shutdown));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.wait_model_for(Some(left))? {
                None => return Ok(None),
                Some(incoming) => {
                    if self.take(incoming) == Status::Shutdown {
                        return Ok(Some(Status::Shutdown));
                    }
                }
            }
        }
    }

    /// One training step's communication: pushes every key's gradient (all parts, pipelined:
    /// the server sums and answers each part as it arrives), ticks the clock, then waits for
    /// every model.
    pub fn step(&mut self) -> Result<Status, LinkError> {
        if self.shutdown {
            return Ok(Status::Shutdown);
        }
        // The wait below moves whatever the transport has not taken yet.
        for key in 0..self.awaited.len() {
            self.push_parts(key)?;
        }
        self.clock();
        self.wait_all()
    }

    /// [`step`](Self::step) with the gradient computed part by part: `grad(key, elems, model,
    /// grad)` fills the gradient of elements `elems` of tensor `key` from their model, and each
    /// part is pushed as soon as it is computed, so computing the next part overlaps sending this
    /// one and the server summing it. The gradient of an element may depend only on the
    /// elements of its part (element-wise updates, or a gradient computed elsewhere and copied
    /// in).
    pub fn step_with(
        &mut self,
        mut grad: impl FnMut(usize, Range<usize>, &[f32], &mut [f32]),
    ) -> Result<Status, LinkError> {
        if self.shutdown {
            return Ok(Status::Shutdown);
        }
        for key in 0..self.awaited.len() {
            self.begin_push(key);
            for p in self.link.parts().of_tensor(key) {
                let elems = self.link.parts()[p].elems();
                let (model, g) = self.link.part(p);
                grad(key, elems, model, g);
                self.push_part(key, p)?;
            }
        }
        self.clock();
        self.wait_all()
    }

    fn receive(&mut self) -> Result<Status, LinkError> {
        if self.shutdown {
            return Ok(Status::Shutdown);
        }
        let incoming = self.link.wait_model()?;
        Ok(self.take(incoming))
    }

    /// Records what came in: a part's model, or the end of the run.
    fn take(&mut self, incoming: Incoming) -> Status {
        match incoming {
            Incoming::Model { key, round } => {
                let p = key as usize;
                self.rounds[p] = round;
                if std::mem::take(&mut self.awaiting[p]) {
                    self.awaited[self.link.parts()[key].tensor as usize] -= 1;
                }
                Status::Ready
            }
            Incoming::Shutdown => {
                self.shutdown = true;
                Status::Shutdown
            }
        }
    }

    /// Tells the server this worker is leaving, and closes.
    pub fn bye(mut self) -> Result<(), LinkError> {
        self.link.bye()
    }

    /// Tells the server this worker is leaving; the link is closed, the client kept (for its
    /// models).
    pub fn bye_and_stay(&mut self) -> Result<(), LinkError> {
        self.shutdown = true;
        self.link.bye()
    }
}
