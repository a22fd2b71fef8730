//! `hetsync._native`: the Python binding of Het-Sync's worker client ([`worker::Worker`]) and
//! server ([`server::Server`]). The pure-Python package `hetsync` re-exports it with type hints.
//!
//! Arrays cross the boundary without copies where the transport allows: a model is handed out
//! as a read-only NumPy view of the link's model buffer (on RDMA, the registered memory the
//! server writes into), a gradient is either written by the caller straight into the link's
//! gradient buffer ([`worker::Worker::gradient`]) or copied into it once. Every wait releases
//! the GIL.

mod arrays;
mod server;
mod worker;

use pyo3::create_exception;
use pyo3::prelude::*;

create_exception!(
    hetsync,
    HetSyncError,
    pyo3::exceptions::PyRuntimeError,
    "A Het-Sync operation failed: the connection, the server, or a worker used after close(). The message is the Rust error's, naming the operation and the peer."
);

/// Turns any Rust error into a `HetSyncError` carrying its message (and its sources').
pub(crate) fn failed(what: &str, e: &dyn std::error::Error) -> PyErr {
    let mut msg = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    HetSyncError::new_err(msg)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<worker::Worker>()?;
    m.add_class::<server::Server>()?;
    m.add("HetSyncError", m.py().get_type::<HetSyncError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// The transport named `name`: `auto`, `rdma` or `tcp`.
pub(crate) fn choice(name: &str) -> PyResult<hetsync_transport::any::Choice> {
    use hetsync_transport::any::Choice;
    match name {
        "auto" => Ok(Choice::Auto),
        "rdma" => Ok(Choice::Rdma),
        "tcp" => Ok(Choice::Tcp),
        _ => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "transport must be \"auto\", \"rdma\" or \"tcp\", got {name:?}"
        ))),
    }
}

/// The job's secret from `path` (`secret_file=`); warns on stderr when others may read it.
pub(crate) fn read_secret(path: &std::path::Path) -> PyResult<hetsync_transport::auth::Secret> {
    let (secret, warning) = hetsync_transport::auth::Secret::from_file(path)
        .map_err(|e| failed("reading the job's secret", &e))?;
    if let Some(w) = warning {
        eprintln!("hetsync: warning: {w}");
    }
    Ok(secret)
}

/// `value` seconds as a duration, or a `ValueError` naming `what` (negative, not a number, or
/// beyond a year, which no wait here needs).
pub(crate) fn seconds(what: &str, value: f64) -> PyResult<std::time::Duration> {
    const YEAR: f64 = 365.0 * 24.0 * 3600.0;
    if (0.0..=YEAR).contains(&value) {
        Ok(std::time::Duration::from_secs_f64(value))
    } else {
        Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{what} must be a number of seconds from 0 to a year, got {value}"
        )))
    }
}
