//! SIGINT/SIGTERM set a flag the server checks whenever its event loop wakes up; the handler is
//! installed without SA_RESTART, so a signal interrupts `epoll_wait` and is seen at once.
//! (`scancel --signal=TERM` on Slurm ends the server this way, cleanly.)

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// Set once SIGINT or SIGTERM arrived.
pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Installs the handler for SIGINT and SIGTERM.
pub(crate) fn install() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and it
        // replaces no handler that other code relies on.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}
