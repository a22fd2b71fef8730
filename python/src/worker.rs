//! `hetsync.Worker`: a training process's connection to the server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::choice;
use hetsync::client::{Client, ConnectOptions, LinkError, Status};
use hetsync::sync::PushClock;
use numpy::PyArrayDyn;
use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::arrays::{copy_into, copy_out, float32, view};
use crate::{failed, HetSyncError};

/// A worker's connection to a Het-Sync server: push gradients, pull models.
///
/// ``Worker(server, rank=None, *, dims, workers=None, transport="auto", secret_file=None,
/// connect_timeout=60.0, rdma_device=None, gid_index=None)`` connects to ``server``
/// (``"HOST:PORT"``) and joins the job as ``rank``. Without ``rank``, the rank and the job size
/// come from Slurm (``SLURM_PROCID``, ``SLURM_NTASKS``). ``dims`` gives every tensor (key) in
/// key order, as an element count or a shape tuple; it must match the server's.
///
/// Models come back as read-only float32 arrays over the link's own model buffer (on RDMA, the
/// memory the server writes into): no copy. Such an array shows the key's latest model until
/// the key is pushed again; from then until the next pull its contents are being replaced, so
/// keep a copy (``pull(key, out=...)`` or ``.copy()``) to hold on to one. Gradients are copied
/// once into the link's gradient buffer, or not at all when written into ``gradient(key)``.
///
/// Every wait releases the GIL and handles signals every 100 ms (Ctrl-C raises
/// ``KeyboardInterrupt``; pulling again resumes the wait). A worker is used by one thread at a
/// time: a call from another thread while one waits raises ``RuntimeError`` (already borrowed).
/// Errors of the connection or the server raise ``HetSyncError`` with the Rust message, and
/// after a connection error every call raises it again; a wrong dtype raises ``TypeError``, a
/// wrong shape ``ValueError`` (a gradient has the tensor's shape, or is flat), a key out of
/// range ``IndexError``.
#[pyclass(module = "hetsync._native", subclass)]
pub struct Worker {
    client: Client,
    shapes: Vec<Vec<usize>>,
    rank: u32,
    workers: u32,
    closed: bool,
    /// The error that broke the connection, raised again by every later call.
    broken: Option<String>,
}

/// How long a wait runs without the GIL before it looks for signals (Ctrl-C).
const TICK: Duration = Duration::from_millis(100);

/// The rank and job size: as given, else from Slurm's variables.
fn rank_and_size(rank: Option<u32>, workers: Option<u32>) -> PyResult<(u32, u32)> {
    let env = |name: &str| -> PyResult<Option<u32>> {
        match std::env::var(name) {
            Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                PyValueError::new_err(format!("{name}={v:?} is not a non-negative integer"))
            }),
            Err(_) => Ok(None),
        }
    };
    // Slurm's variables only when the rank is not given: an explicit rank in an allocation
    // of another size must not be checked against it.
    let (rank, workers) = match rank {
        Some(r) => (r, workers.unwrap_or(0)),
        None => (
            env("SLURM_PROCID")?.ok_or_else(|| {
                PyValueError::new_err(
                    "no rank: pass rank=..., or run under Slurm (srun sets SLURM_PROCID)",
                )
            })?,
            match workers {
                Some(w) => w,
                None => env("SLURM_NTASKS")?.unwrap_or(0),
            },
        ),
    };
    if workers != 0 && rank >= workers {
        return Err(PyValueError::new_err(format!(
            "rank {rank} is not below the job's {workers} workers"
        )));
    }
    Ok((rank, workers))
}

/// Every tensor's shape: an element count is a 1-D shape.
pub(crate) fn shapes_of(dims: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<usize>>> {
    let bad = || {
        PyValueError::new_err(
            "dims must list every tensor as an element count or a shape tuple, e.g. [(64, 10), 10]",
        )
    };
    let mut shapes = Vec::new();
    for item in dims.try_iter().map_err(|_| bad())? {
        let item = item?;
        let shape = match item.extract::<usize>() {
            Ok(n) => vec![n],
            Err(_) => item.extract::<Vec<usize>>().map_err(|_| bad())?,
        };
        if shape.iter().product::<usize>() == 0 {
            return Err(PyValueError::new_err(format!(
                "tensor {} has shape {shape:?}: every tensor needs at least one element",
                shapes.len()
            )));
        }
        shapes.push(shape);
    }
    if shapes.is_empty() {
        return Err(bad());
    }
    Ok(shapes)
}

impl Worker {
    fn check_open(&self) -> PyResult<()> {
        if let Some(e) = &self.broken {
            return Err(HetSyncError::new_err(format!(
                "worker {}'s connection failed earlier ({e}): create a new Worker to rejoin",
                self.rank
            )));
        }
        if self.closed {
            return Err(HetSyncError::new_err(format!(
                "worker {} is closed: create a new Worker to rejoin",
                self.rank
            )));
        }
        Ok(())
    }

    fn check_key(&self, key: usize) -> PyResult<()> {
        if key >= self.shapes.len() {
            return Err(PyIndexError::new_err(format!(
                "key {key} out of range: the job has {} tensors",
                self.shapes.len()
            )));
        }
        Ok(())
    }

    /// Records that the link failed doing `what`, and returns the error to raise.
    fn broke(&mut self, what: &str, e: LinkError) -> PyErr {
        let err = failed(what, &e);
        self.broken = Some(err.to_string());
        err
    }

    /// Waits for key's model (every awaited model for `None`) without the GIL, in slices of
    /// [`TICK`] between which signals are handled: Ctrl-C raises `KeyboardInterrupt`, and a
    /// later call waits on where this one stopped.
    fn wait(&mut self, py: Python<'_>, key: Option<usize>, what: &str) -> PyResult<Status> {
        loop {
            let client = &mut self.client;
            match py.detach(|| client.wait_for(key, TICK)) {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => py.check_signals()?,
                Err(e) => return Err(self.broke(what, e)),
            }
        }
    }

    /// Pushes `keys` without the GIL.
    fn push_keys(&mut self, py: Python<'_>, keys: std::ops::Range<usize>) -> PyResult<()> {
        let client = &mut self.client;
        let pushed = py.detach(|| {
            keys.clone()
                .try_for_each(|k| client.push(k).map_err(|e| (k, e)))
        });
        pushed.map_err(|(k, e)| self.broke(&format!("pushing key {k}"), e))
    }

    /// Raises unless `key` may be pushed now.
    fn check_pushable(&self, key: usize) -> PyResult<()> {
        if self.client.awaiting(key) {
            return Err(HetSyncError::new_err(format!(
                "key {key}'s model is not back yet (since its last push, or the job's start): pull({key}) before pushing it"
            )));
        }
        if self.client.push_clock() == PushClock::WorkerClock && self.client.pushed(key) {
            return Err(HetSyncError::new_err(format!(
                "key {key} was pushed already in this iteration: call clock() between iterations"
            )));
        }
        Ok(())
    }

    /// Copies `grad` (when given) into key's gradient buffer.
    fn take_gradient(&mut self, key: usize, grad: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        if let Some(grad) = grad {
            let what = format!("key {key}'s gradient");
            let grad = float32(grad, &self.shapes[key], &what)?;
            copy_into(&grad, self.client.tensor(key).1)?;
        }
        Ok(())
    }
}

/// Connects without the GIL, retrying a server that is not up yet until `connect_wait` has
/// passed (backing off from 50 ms to 2 s, as the Rust worker does) and handling signals while it
/// waits, so that Ctrl-C stops a worker waiting for its server. `Err(Ok(e))` is a signal
/// handler's exception, `Err(Err(e))` the link's error.
fn connect(py: Python<'_>, mut opts: ConnectOptions) -> Result<Client, Result<PyErr, LinkError>> {
    let deadline = Instant::now() + opts.connect_wait;
    opts.connect_wait = Duration::ZERO; // one attempt per call: the retries are here
    let mut pause = Duration::from_millis(50);
    loop {
        match py.detach(|| Client::connect(&opts)) {
            // Nobody listening yet (or unreachable): try again while the time lasts.
            Err(LinkError::Connect { .. }) if Instant::now() < deadline => {
                let until = (Instant::now() + pause).min(deadline);
                while let Some(left) = until
                    .checked_duration_since(Instant::now())
                    .filter(|d| !d.is_zero())
                {
                    py.detach(|| std::thread::sleep(left.min(TICK)));
                    py.check_signals().map_err(Ok)?;
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            r => return r.map_err(Err),
        }
    }
}

/// The model of `key` as a read-only view owned by `this`.
fn model_view<'py>(this: &Bound<'py, Worker>, key: usize) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let w = this.borrow();
    let model = w.client.model(key);
    let (ptr, len, shape) = (model.as_ptr(), model.len(), w.shapes[key].clone());
    drop(w);
    // SAFETY: the link's buffers are mapped once at connect and unmapped only when the Client
    // drops, which happens only when the Worker (the array's base) is freed; close() keeps them.
    unsafe { view(this.clone().into_any(), ptr, len, &shape, false) }
}

#[pymethods]
impl Worker {
    #[new]
    #[pyo3(signature = (server, rank=None, *, dims, workers=None, transport="auto", secret_file=None, connect_timeout=60.0, rdma_device=None, gid_index=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        server: &str,
        rank: Option<u32>,
        dims: &Bound<'_, PyAny>,
        workers: Option<u32>,
        transport: &str,
        secret_file: Option<PathBuf>,
        connect_timeout: f64,
        rdma_device: Option<String>,
        gid_index: Option<u8>,
    ) -> PyResult<Self> {
        let (rank, workers) = rank_and_size(rank, workers)?;
        let shapes = shapes_of(dims)?;
        let mut opts = ConnectOptions::new(
            server,
            rank,
            shapes.iter().map(|s| s.iter().product()).collect(),
        );
        opts.workers = workers;
        opts.transport = choice(transport)?;
        opts.rdma.device = rdma_device;
        opts.rdma.gid_index = gid_index;
        opts.connect_wait = crate::seconds("connect_timeout", connect_timeout)?;
        opts.secret = secret_file.as_deref().map(crate::read_secret).transpose()?;
        let client = connect(py, opts).map_err(|e| {
            e.unwrap_or_else(|e| failed(&format!("worker {rank} joining {server}"), &e))
        })?;
        Ok(Self {
            client,
            shapes,
            rank,
            workers,
            closed: false,
            broken: None,
        })
    }

    /// This worker's rank.
    #[getter]
    fn rank(&self) -> u32 {
        self.rank
    }

    /// Workers in the job as this worker was told (0: left to the server).
    #[getter]
    fn workers(&self) -> u32 {
        self.workers
    }

    /// Every tensor's shape, in key order.
    #[getter]
    fn shapes(&self) -> Vec<Vec<usize>> {
        self.shapes.clone()
    }

    /// Every tensor's element count, in key order.
    #[getter]
    fn dims(&self) -> Vec<usize> {
        self.client.dims().to_vec()
    }

    /// Which transport the connection uses, and why, in one line.
    #[getter]
    fn transport(&self) -> String {
        self.client.transport().to_string()
    }

    /// Whether the server ended the run (or this worker closed): pulls return the last model,
    /// pushes do nothing.
    #[getter]
    fn finished(&self) -> bool {
        self.client.finished()
    }

    /// Iterations this worker completed (``clock()`` calls).
    #[getter]
    fn clock_count(&self) -> u64 {
        self.client.worker_clock()
    }

    /// The round of key's latest model: how many updates it has seen.
    fn round(&self, key: usize) -> PyResult<u64> {
        self.check_key(key)?;
        Ok(self.client.round(key))
    }

    /// Waits (without the GIL) until key's model is back, then returns it: a read-only view of
    /// the link's model buffer, or, with ``out`` (a writable float32 array of the same size),
    /// a copy into ``out``, which is returned.
    #[pyo3(signature = (key, out=None))]
    fn pull<'py>(
        this: &Bound<'py, Self>,
        key: usize,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let py = this.py();
        {
            let mut w = this.borrow_mut();
            w.check_open()?;
            w.check_key(key)?;
            let what = format!("pull({key})'s out");
            let out = out.map(|o| float32(o, &w.shapes[key], &what)).transpose()?;
            w.wait(py, Some(key), &format!("pulling key {key}"))?;
            if let Some(out) = out {
                copy_out(w.client.model(key), &out, &what)?;
                return Ok(out);
            }
        }
        model_view(this, key)
    }

    /// Key's gradient buffer as a writable float32 array: compute the gradient into it (e.g.
    /// ``np.matmul(a, b, out=g)``) and ``push(key)`` sends it without any copy. Only between a
    /// pull of the key and its next push.
    fn gradient<'py>(this: &Bound<'py, Self>, key: usize) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let (ptr, len, shape) = {
            let mut w = this.borrow_mut();
            w.check_open()?;
            w.check_key(key)?;
            if w.client.awaiting(key) {
                return Err(HetSyncError::new_err(format!(
                    "key {key}'s gradient buffer is being sent: pull({key}) first"
                )));
            }
            let shape = w.shapes[key].clone();
            let grad = w.client.tensor(key).1;
            (grad.as_mut_ptr() as *const f32, grad.len(), shape)
        };
        // SAFETY: as for models: the buffer lives as long as the Worker, the array's base.
        unsafe { view(this.clone().into_any(), ptr, len, &shape, true) }
    }

    /// Pushes key's gradient: ``grad`` (float32, the tensor's size, any shape) is copied into
    /// the link's gradient buffer first; without it (or when it is ``gradient(key)`` itself)
    /// the buffer is sent as it is. Pull the key before pushing it again; under a vector-clock
    /// policy (bsp, ssp, asp) call ``clock()`` between iterations.
    #[pyo3(signature = (key, grad=None))]
    fn push(
        &mut self,
        py: Python<'_>,
        key: usize,
        grad: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.check_open()?;
        self.check_key(key)?;
        if self.client.finished() {
            return Ok(());
        }
        self.check_pushable(key)?;
        self.take_gradient(key, grad)?;
        self.push_keys(py, key..key + 1)
    }

    /// Ends this worker's iteration (Angel's clock): under bsp/ssp/asp the reads that follow are
    /// at the next clock.
    fn clock(&mut self) -> PyResult<()> {
        self.check_open()?;
        self.client.clock();
        Ok(())
    }

    /// One training step's communication for every key: copies ``grads`` (one float32 array
    /// per key, or ``None`` to send the gradient buffers as they are) in, pushes every key
    /// (pipelined: the server answers each part as it arrives), ticks the clock and waits
    /// (without the GIL) for every model. Returns the models, read-only views as ``pull``'s.
    #[pyo3(signature = (grads=None))]
    fn step<'py>(
        this: &Bound<'py, Self>,
        grads: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let py = this.py();
        let keys = {
            let mut w = this.borrow_mut();
            w.check_open()?;
            let keys = w.shapes.len();
            if !w.client.finished() {
                for key in 0..keys {
                    w.check_pushable(key)?;
                }
                if let Some(grads) = grads {
                    let grads: Vec<Bound<'py, PyAny>> =
                        grads.try_iter()?.collect::<Result<_, _>>()?;
                    if grads.len() != keys {
                        return Err(PyValueError::new_err(format!(
                            "step() got {} gradients; the job has {keys} tensors",
                            grads.len()
                        )));
                    }
                    for (key, g) in grads.iter().enumerate() {
                        w.take_gradient(key, Some(g))?;
                    }
                }
                w.push_keys(py, 0..keys)?;
                w.client.clock();
                w.wait(py, None, "waiting for the models of a step")?;
            }
            keys
        };
        let models = (0..keys)
            .map(|k| model_view(this, k))
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, models)
    }

    /// Tells the server this worker is leaving. Arrays already handed out stay valid; every
    /// later call raises ``HetSyncError``. Closing twice does nothing.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let was_finished = self.client.finished();
        if self.broken.is_some() {
            return Ok(()); // nobody to say goodbye to
        }
        let client = &mut self.client;
        match py.detach(|| client.bye_and_stay()) {
            // A server that already ended the run may have closed the connection.
            Err(_) if was_finished => Ok(()),
            r => r.map_err(|e| failed(&format!("worker {} leaving", self.rank), &e)),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Worker(rank={}, tensors={}, {}{})",
            self.rank,
            self.shapes.len(),
            self.client.transport(),
            if self.closed { ", closed" } else { "" }
        )
    }
}
