"""A watchdog per test: a call that hangs while holding the GIL (a wait that forgot to release
it) would stop pytest's own timeouts too; faulthandler's C thread needs no GIL: it writes every
thread's stack to $HETSYNC_HANG_LOG (run-tests.sh prints it) or stderr, and exits, so the run
fails instead of hanging."""

import faulthandler
import os
import sys

import pytest

HANG_S = 120
_log = open(os.environ["HETSYNC_HANG_LOG"], "w+") if os.environ.get("HETSYNC_HANG_LOG") else None


@pytest.fixture(autouse=True)
def hang_watchdog(request):
    if _log:
        _log.seek(0)
        _log.truncate()
        _log.write(f"{request.node.nodeid} still running after {HANG_S} s; every thread's stack:\n")
        _log.flush()
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=_log or sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
