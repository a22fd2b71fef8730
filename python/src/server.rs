//! `hetsync.Server`: a Het-Sync server running in this process, for tests and notebooks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hetsync::server::{LateMode, Server as RustServer, ServerConfig, ServerError, ServerReport};
use hetsync::sync::SyncMode;
use numpy::PyArrayMethods;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::float32;
use crate::{choice, failed};

type Run = JoinHandle<Result<ServerReport, ServerError>>;

/// A Het-Sync server on a thread of this process (the ``hetsync server`` command's engine).
///
/// ``Server(workers, dims, *, policy="timeout", timeout_ms=10.0, staleness=3, late="fold",
/// lr=0.1, rounds=None, seconds=None, listen="127.0.0.1:0", transport="auto",
/// partition_bytes=524288, secret_file=None, start_after_ms=None, evict_after_ms=None,
/// log=False, init=None)`` binds at once (``address`` says where) and serves until ``rounds`` job rounds
/// or ``seconds`` of training are done, or until ``stop()``. The model starts at ``init`` (one
/// float32 array per tensor) or at zero; the
/// server applies ``model -= lr * mean(gradients)`` per round (barrier policies) or
/// ``model -= lr * gradient / workers`` per push (bsp, ssp, asp).
///
/// Policies: ``naive`` (wait for every worker), ``timeout`` (close a round ``timeout_ms`` after
/// its first push), ``adaptive`` (the timeout learnt, capped by ``timeout_ms``), ``bsp``,
/// ``ssp`` (``staleness`` clocks ahead at most), ``asp``. ``late``: what the barrier policies
/// do with a gradient that missed its round, ``"fold"`` it into the next or ``"drop"`` it.
///
/// Any thread may call its methods: ``stop()`` from one while another is in ``wait()`` ends
/// both. Every wait handles signals (Ctrl-C) every 100 ms.
#[pyclass(module = "hetsync._native", subclass, frozen)]
pub struct Server {
    address: String,
    transport: String,
    policy: &'static str,
    stop: Arc<AtomicBool>,
    /// The server's thread until it was joined; locked only briefly (never across a wait).
    run: Mutex<Option<Run>>,
    /// How the run ended, once joined: its report, or the error that stopped it.
    outcome: Mutex<Option<Result<Py<PyDict>, String>>>,
}

/// How long a wait runs without the GIL before it looks for signals (Ctrl-C).
const TICK: Duration = Duration::from_millis(100);

fn millis(what: &str, ms: f64) -> PyResult<Duration> {
    crate::seconds(what, ms / 1e3).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a number of milliseconds from 0 to a year, got {ms}"
        ))
    })
}

/// A lock that a panic elsewhere did not make unusable (the data stays consistent: every
/// critical section here is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The run's report as a dict: `started`, `elapsed_s`, `rounds_per_sec`, `kernel` and every
/// counter of `ServerStats`.
fn report_dict<'py>(py: Python<'py>, r: &ServerReport) -> PyResult<Bound<'py, PyDict>> {
    let stats = serde_json::to_string(&r.stats).expect("counters serialise");
    let d = py
        .import("json")?
        .call_method1("loads", (stats,))?
        .cast_into::<PyDict>()?;
    d.set_item("started", r.started)?;
    d.set_item("elapsed_s", r.elapsed.as_secs_f64())?;
    d.set_item("rounds_per_sec", r.rounds_per_sec())?;
    d.set_item("kernel", format!("{:?}", r.kernel))?;
    Ok(d)
}

/// `init` (one float32 array per tensor, of its shape or flat) as one vector, every tensor in
/// key order.
fn initial_model(init: &Bound<'_, PyAny>, shapes: &[Vec<usize>]) -> PyResult<Vec<f32>> {
    let arrays: Vec<Bound<'_, PyAny>> = init.try_iter()?.collect::<Result<_, _>>()?;
    if arrays.len() != shapes.len() {
        return Err(PyValueError::new_err(format!(
            "init has {} arrays; the job has {} tensors",
            arrays.len(),
            shapes.len()
        )));
    }
    let mut model = Vec::new();
    for (key, (a, shape)) in arrays.iter().zip(shapes).enumerate() {
        let a = float32(a, shape, &format!("init[{key}]"))?;
        model.extend(a.try_readonly()?.as_array().iter());
    }
    Ok(model)
}

impl Server {
    /// Waits (without the GIL, handling signals every [`TICK`]) up to `timeout` for the run to
    /// end; its report once it has, `None` if it has not by then.
    fn finish<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<Duration>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(outcome) = lock(&self.outcome).as_ref() {
                return match outcome {
                    Ok(report) => Ok(Some(report.bind(py).clone())),
                    Err(e) => Err(crate::HetSyncError::new_err(e.clone())),
                };
            }
            let slice = Instant::now() + TICK;
            let ended = py.detach(|| loop {
                if lock(&self.run).as_ref().is_none_or(|r| r.is_finished()) {
                    return true;
                }
                let now = Instant::now();
                if now >= slice || deadline.is_some_and(|d| now >= d) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(2));
            });
            if ended {
                // Whoever takes the finished thread records its outcome; a thread that finds
                // it gone loops and reads that.
                let run = lock(&self.run).take();
                if let Some(run) = run {
                    let outcome = match run.join() {
                        Ok(Ok(report)) => Ok(report_dict(py, &report)?.unbind()),
                        Ok(Err(e)) => Err(failed("the server", &e).to_string()),
                        Err(_) => Err("the server thread panicked".to_string()),
                    };
                    *lock(&self.outcome) = Some(outcome);
                }
                continue;
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (workers, dims, *, policy="timeout", timeout_ms=10.0, staleness=3, late="fold", lr=0.1, rounds=None, seconds=None, listen="127.0.0.1:0", transport="auto", partition_bytes=512<<10, secret_file=None, start_after_ms=None, evict_after_ms=None, log=false, init=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: usize,
        dims: &Bound<'_, PyAny>,
        policy: &str,
        timeout_ms: f64,
        staleness: u64,
        late: &str,
        lr: f32,
        rounds: Option<u64>,
        seconds: Option<f64>,
        listen: &str,
        transport: &str,
        partition_bytes: usize,
        secret_file: Option<PathBuf>,
        start_after_ms: Option<f64>,
        evict_after_ms: Option<f64>,
        log: bool,
        init: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let shapes = crate::worker::shapes_of(dims)?;
        let dims: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let listen = listen.parse().map_err(|_| {
            PyValueError::new_err(format!(
                "listen must be IP:PORT (port 0: any free one), got {listen:?}"
            ))
        })?;
        let mode = SyncMode::named(policy, millis("timeout_ms", timeout_ms)?, staleness)
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "policy must be one of naive, timeout, adaptive, bsp, ssp, asp; got {policy:?}"
                ))
            })?;
        if policy == "ssp" && staleness == 0 {
            return Err(PyValueError::new_err(
                "ssp needs staleness >= 1 (staleness 0 is policy=\"bsp\")",
            ));
        }
        let late = match late {
            "fold" => LateMode::Fold,
            "drop" => LateMode::Drop,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "late must be \"fold\" or \"drop\", got {late:?}"
                )))
            }
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(PyValueError::new_err(format!(
                "lr must be a positive number, got {lr}"
            )));
        }
        let init_model = init.map(|i| initial_model(i, &shapes)).transpose()?;
        let mut cfg = ServerConfig {
            mode,
            late,
            lr,
            rounds,
            partition_bytes,
            transport: choice(transport)?,
            log_events: log,
            init_model,
            ..ServerConfig::new(listen, workers, dims)
        };
        cfg.duration = seconds.map(|s| crate::seconds("seconds", s)).transpose()?;
        cfg.start_after = start_after_ms
            .map(|m| millis("start_after_ms", m))
            .transpose()?;
        cfg.evict_after = evict_after_ms
            .map(|m| millis("evict_after_ms", m))
            .transpose()?;
        cfg.secret = secret_file.as_deref().map(crate::read_secret).transpose()?;
        let (server, how) = py
            .detach(|| RustServer::bind(cfg))
            .map_err(|e| failed("starting the server", &e))?;
        let address = server.local_addr().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let run = std::thread::Builder::new()
            .name("hetsync-server".into())
            .spawn(move || server.run(&flag))
            .map_err(|e| failed("starting the server thread", &e))?;
        Ok(Self {
            address,
            transport: how,
            policy: mode.name(),
            stop,
            run: Mutex::new(Some(run)),
            outcome: Mutex::new(None),
        })
    }

    /// ``"IP:PORT"`` the server listens on, for ``Worker(server.address, ...)``.
    #[getter]
    fn address(&self) -> String {
        self.address.clone()
    }

    /// Which transport the server uses, and why, in one line.
    #[getter]
    fn transport(&self) -> String {
        self.transport.clone()
    }

    /// The synchronisation policy's name.
    #[getter]
    fn policy(&self) -> &'static str {
        self.policy
    }

    /// Whether the server is still serving.
    #[getter]
    fn running(&self) -> bool {
        lock(&self.run).as_ref().is_some_and(|r| !r.is_finished())
    }

    /// Waits (without the GIL) for the run to end by itself (``rounds`` or ``seconds``), at most
    /// ``timeout`` seconds when given. Returns the report (a dict of counters), or ``None`` if
    /// the run has not ended. Raises ``HetSyncError`` if the server failed.
    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let timeout = timeout.map(|t| crate::seconds("timeout", t)).transpose()?;
        self.finish(py, timeout)
    }

    /// Stops the server (workers are told the run is over) and returns its report.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish(py, None)
    }

    fn __repr__(&self) -> String {
        format!(
            "Server({}, policy={}, {})",
            self.address,
            self.policy,
            if self.running() { "running" } else { "stopped" }
        )
    }
}

impl Drop for Server {
    /// Tells the server's thread to stop, without waiting for it: a drop holds the GIL, which
    /// workers in this process may need to say goodbye. The thread ends within its shutdown
    /// grace (3 s) by itself.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
