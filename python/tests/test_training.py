"""A short real training run: examples/train_digits.py's job, 3 worker processes on the digits
with stragglers, 150 rounds under the timeout barrier and under SSP. The loss must fall and
the held-out accuracy beat chance (10%) by far. The runs are bounded in rounds, not time, so
that a loaded machine makes them slower, not worse."""

import argparse
import importlib
import pathlib
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def example():
    # A plain import from examples/, which stays on the path: the worker processes (spawned)
    # import it again to find their entry point.
    sys.path.insert(0, str(EXAMPLE.parent))
    yield importlib.import_module("train_digits")
    sys.path.remove(str(EXAMPLE.parent))


def args(**kw):
    base = dict(workers=3, seconds=120.0, rounds=150, step_ms=5.0, slow_factor=10.0, slow_fraction=0.25,
                slow_prob=0.25, timeout_ms=5.0, staleness=3, lr=0.5, batch=64,
                eval_every_ms=50.0, transport="tcp", seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("policy,scenario", [("timeout", "persistent"), ("ssp", "transient")])
def test_a_short_training_run_learns_the_digits(example, policy, scenario):
    init = example.init_params([(64, 32), (32,), (32, 10), (10,)], 0)
    run = example.run(policy, scenario, args(), init)
    curve = run["curve"]
    first, last = curve[0], curve[-1]
    assert len(curve) >= 5, curve
    # (time, worker 0's steps, training loss, training accuracy, held-out accuracy)
    assert first[2] > 1.5, first  # an untrained 10-class model: about ln(10) = 2.3
    assert last[2] < 0.5 * first[2], (first, last)
    assert last[4] > 0.8, last
    assert run["report"]["rounds"] == 150, run["report"]
    if scenario == "persistent":
        # The straggler (rank 2) is 10 times slower; the others are not held back by it (about
        # 5 times its steps on an idle machine; a generous bound).
        steps = run["steps"]
        assert steps[0] > 1.5 * steps[2], steps
