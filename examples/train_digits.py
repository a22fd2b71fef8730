#!/usr/bin/env python3
"""Data-parallel training with Het-Sync under stragglers: convergence against wall-clock time.

A small MLP (64 -> 32 -> 10, ReLU, softmax cross-entropy; one Het-Sync key per weight and
bias tensor) is trained on scikit-learn's handwritten digits (``load_digits``, shipped with the
package: no download) by W worker processes, each on its own shard of the training set. The
server is a ``hetsync.Server`` in this process; every worker is a separate process with a
``hetsync.Worker``.

A worker's step computes the gradient of a minibatch of its shard and is padded to
``--step-ms`` (the compute time of a larger model); a straggler's step is padded to
``--slow-factor`` times that. Two scenarios:

- persistent: the last 25% of the workers are slow at every step;
- transient: every worker is slow at each step with probability 0.25.

For each scenario and each policy (naive, timeout, adaptive, bsp, ssp, asp) the job trains
for ``--seconds`` of wall-clock time; worker 0 evaluates the model it holds (training loss
over the whole training set, accuracy on the held-out set) as it goes. The script writes
``DIR/curves.csv`` (every evaluation), ``DIR/summary.csv`` and ``DIR/train_digits.png`` (loss
and accuracy against time), and prints a table: each policy's final loss and accuracy, and
how soon it reached naive's final training loss.

    pip install ./python scikit-learn matplotlib
    python examples/train_digits.py                   # both scenarios, every policy, ~4 min
    python examples/train_digits.py --scenarios persistent --policies naive,timeout --seconds 5
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

import hetsync

POLICIES = ["naive", "timeout", "adaptive", "bsp", "ssp", "asp"]
SCENARIOS = ["persistent", "transient"]


@dataclass
class Job:
    """Everything a worker process needs to know (sent to it when it starts)."""

    address: str
    workers: int
    shapes: list
    scenario: str
    step_s: float
    slow_factor: float
    slow_prob: float
    slow_workers: int
    batch: int
    eval_every_s: float
    seed: int
    transport: str


def load_data(seed: int, test_fraction: float = 0.2):
    """The digits (8x8 images, 10 classes) scaled to [0, 1], shuffled, split train/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def init_params(shapes, seed: int):
    """He-initialised weights, zero biases: the server's starting model."""
    rng = np.random.default_rng(seed)
    params = []
    for shape in shapes:
        if len(shape) == 2:
            params.append((rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])).astype(np.float32))
        else:
            params.append(np.zeros(shape, dtype=np.float32))
    return params


def forward(params, x):
    w1, b1, w2, b2 = params
    h = np.maximum(x @ w1 + b1, 0.0)
    logits = h @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return h, p


def loss_and_accuracy(params, x, y):
    _, p = forward(params, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, float((p.argmax(axis=1) == y).mean())


def gradients(params, x, y):
    """The mean cross-entropy's gradient over the batch, one float32 array per tensor."""
    w1, _, w2, _ = params
    h, p = forward(params, x)
    d = p
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    gw2 = h.T @ d
    gb2 = d.sum(axis=0)
    dh = (d @ w2.T) * (h > 0)
    gw1 = x.T @ dh
    gb1 = dh.sum(axis=0)
    return [g.astype(np.float32, copy=False) for g in (gw1, gb1, gw2, gb2)]


def worker_main(job: Job, rank: int, results) -> None:
    """One worker process: load the data, train on its shard until the server ends the run.
    Worker 0 also evaluates."""
    x_train, y_train, x_test, y_test = load_data(job.seed)
    shard = np.array_split(np.arange(len(x_train)), job.workers)[rank]
    xs, ys = x_train[shard], y_train[shard]
    evaluation = (x_train, y_train, x_test, y_test) if rank == 0 else None
    rng = np.random.default_rng(job.seed * 1000 + rank)
    persistent_slow = job.scenario == "persistent" and rank >= job.workers - job.slow_workers
    records = []
    with hetsync.Worker(job.address, rank, dims=job.shapes, workers=job.workers,
                        transport=job.transport) as w:
        params = [w.pull(k) for k in range(len(job.shapes))]  # waits for every worker to join
        t0 = time.monotonic()
        next_eval = 0.0
        steps = 0
        while not w.finished:
            start = time.monotonic()
            if evaluation is not None and start - t0 >= next_eval:
                loss, acc = loss_and_accuracy(params, evaluation[0], evaluation[1])
                _, test_acc = loss_and_accuracy(params, evaluation[2], evaluation[3])
                records.append((start - t0, steps, loss, acc, test_acc))
                next_eval = start - t0 + job.eval_every_s
            idx = rng.integers(0, len(xs), job.batch)
            grads = gradients(params, xs[idx], ys[idx])
            slow = persistent_slow or (job.scenario == "transient" and rng.random() < job.slow_prob)
            pad = job.step_s * (job.slow_factor if slow else 1.0) - (time.monotonic() - start)
            if pad > 0:
                time.sleep(pad)
            params = w.step(grads)
            steps += 1
        if evaluation is not None:
            loss, acc = loss_and_accuracy(params, evaluation[0], evaluation[1])
            _, test_acc = loss_and_accuracy(params, evaluation[2], evaluation[3])
            records.append((time.monotonic() - t0, steps, loss, acc, test_acc))
    results.put((rank, steps, records))


def run(policy: str, scenario: str, args, init) -> dict:
    """Trains one job; returns worker 0's curve and the server's report."""
    shapes = [list(p.shape) for p in init]
    server = hetsync.Server(
        args.workers, shapes, policy=policy, timeout_ms=args.timeout_ms, staleness=args.staleness,
        late="fold", lr=args.lr, seconds=args.seconds, rounds=getattr(args, "rounds", None),
        transport=args.transport, init=init)
    job = Job(server.address, args.workers, shapes, scenario, args.step_ms / 1e3, args.slow_factor,
              args.slow_prob, max(1, round(args.workers * args.slow_fraction)), args.batch,
              args.eval_every_ms / 1e3, args.seed, args.transport)
    ctx = mp.get_context("spawn")  # no fork: this process runs the server's thread
    results = ctx.Queue()
    procs = []
    for rank in range(args.workers):
        # Each worker loads the data itself (the same seed, the same split): what a process
        # is sent stays small.
        p = ctx.Process(target=worker_main, args=(job, rank, results))
        p.start()
        procs.append(p)
    deadline = time.monotonic() + args.seconds + 120
    got = {}
    try:
        while len(got) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{policy}/{scenario}: workers did not finish in time")
            try:
                rank, steps, records = results.get(timeout=1.0)
                got[rank] = (steps, records)
            except Exception:  # queue.Empty
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{policy}/{scenario}: a worker failed "
                                       f"(exit code {dead[0].exitcode}); see its error above")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        report = server.stop()
    return {"policy": policy, "scenario": scenario, "curve": got[0][1],
            "steps": [got[r][0] for r in range(args.workers)], "report": report}


def time_to_reach(curve, target: float, window: int = 5) -> float | None:
    """The first time worker 0's training loss, averaged over its last `window` evaluations
    (a quarter of a second), was at or below `target`: one lucky minibatch does not count."""
    losses = [c[2] for c in curve]
    for i, (t, *_rest) in enumerate(curve):
        if i + 1 >= window and np.mean(losses[i + 1 - window:i + 1]) <= target:
            return t
    return None


def final(curve, tail: float = 0.1):
    """Training loss and held-out accuracy at the end of a run: their means over the
    evaluations in its last 10% (one evaluation alone moves by a percentage point from one SGD
    step to the next)."""
    end = curve[-1][0]
    last = [c for c in curve if c[0] >= (1.0 - tail) * end] or curve[-1:]
    return (float(np.mean([c[2] for c in last])), float(np.mean([c[4] for c in last])))


def summarise(runs):
    """One row per run: final loss and accuracy, and how soon naive's final loss was reached
    (naive's own time too: when its smoothed loss first reached its final loss)."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        group = [r for r in runs if r["scenario"] == scenario]
        naive = next((r for r in group if r["policy"] == "naive"), None)
        target, naive_acc = final(naive["curve"]) if naive else (None, None)
        t_naive = time_to_reach(naive["curve"], target) if naive else None
        for r in group:
            t, steps = r["curve"][-1][:2]
            loss, acc = final(r["curve"])
            reach = time_to_reach(r["curve"], target) if target is not None else None
            rows.append({
                "scenario": scenario, "policy": r["policy"], "seconds": round(t, 2),
                "worker0_steps": steps, "rounds": r["report"]["rounds"],
                "final_train_loss": round(loss, 4), "final_test_accuracy": round(acc, 4),
                "time_to_naive_loss_s": None if reach is None else round(reach, 2),
                "speedup_vs_naive": (round(t_naive / reach, 2) if reach and t_naive else None),
                "accuracy_vs_naive_pp": (round(100 * (acc - naive_acc), 2) if naive else None),
            })
    return rows


def plot(runs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in runs))
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 4.2 * len(scenarios)), squeeze=False)
    for row, scenario in zip(axes, scenarios):
        for r in (r for r in runs if r["scenario"] == scenario):
            t = [c[0] for c in r["curve"]]
            row[0].plot(t, [c[2] for c in r["curve"]], label=r["policy"])
            row[1].plot(t, [100 * c[4] for c in r["curve"]], label=r["policy"])
        row[0].set(title=f"{scenario} stragglers: training loss", xlabel="wall-clock time (s)",
                   ylabel="cross-entropy (whole training set)", yscale="log")
        row[1].set(title=f"{scenario} stragglers: held-out accuracy", xlabel="wall-clock time (s)",
                   ylabel="accuracy (%)", ylim=(80, 100))
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Train an MLP on scikit-learn's digits with W Het-Sync workers under "
                    "stragglers, for every policy; write loss and accuracy against wall-clock "
                    "time (CSV and PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="worker processes")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma separated")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="persistent, transient")
    ap.add_argument("--seconds", type=float, default=15.0,
                    help="wall-clock training time per policy and scenario")
    ap.add_argument("--rounds", type=int, default=None,
                    help="also stop a run after this many rounds (clocks of the slowest worker)")
    ap.add_argument("--step-ms", type=float, default=5.0, help="a normal step's compute time")
    ap.add_argument("--slow-factor", type=float, default=10.0, help="a slow step is this many times longer")
    ap.add_argument("--slow-fraction", type=float, default=0.25,
                    help="persistent: this fraction of the workers is always slow")
    ap.add_argument("--slow-prob", type=float, default=0.25,
                    help="transient: each step of each worker is slow with this probability")
    ap.add_argument("--timeout-ms", type=float, default=5.0,
                    help="timeout: close a round this long after its first push; adaptive: the cap")
    ap.add_argument("--staleness", type=int, default=3, help="ssp's bound")
    ap.add_argument("--lr", type=float, default=0.5, help="the server's SGD learning rate")
    ap.add_argument("--batch", type=int, default=64, help="each worker's minibatch")
    ap.add_argument("--eval-every-ms", type=float, default=50.0,
                    help="worker 0 evaluates at most this often")
    ap.add_argument("--transport", default="auto", choices=["auto", "rdma", "tcp"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="train-digits-results", help="output directory")
    args = ap.parse_args()

    policies = [p for p in args.policies.split(",") if p]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r}: choose from {', '.join(POLICIES)}")
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}: choose from {', '.join(SCENARIOS)}")
    if args.workers < 2:
        ap.error("--workers must be at least 2 (one of them a straggler)")
    os.makedirs(args.out, exist_ok=True)

    data = load_data(args.seed)
    init = init_params([(64, 32), (32,), (32, 10), (10,)], args.seed)
    total = len(policies) * len(scenarios)
    print(f"{args.workers} workers, {len(data[0])} training and {len(data[2])} held-out digits, "
          f"steps of {args.step_ms:g} ms, slow steps x{args.slow_factor:g}; {total} runs of "
          f"{args.seconds:g} s (about {total * (args.seconds + 4) / 60:.1f} min)", flush=True)
    runs = []
    for scenario in scenarios:
        for policy in policies:
            began = time.monotonic()
            r = run(policy, scenario, args, init)
            runs.append(r)
            steps = r["curve"][-1][1]
            loss, acc = final(r["curve"])
            print(f"  [{len(runs)}/{total}] {scenario:10} {policy:8} rounds {r['report']['rounds']:5} "
                  f"| worker steps {r['steps']} | loss {loss:.4f} | held-out accuracy "
                  f"{100 * acc:.1f}% ({time.monotonic() - began:.1f} s)", flush=True)

    with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["scenario", "policy", "time_s", "worker0_step", "train_loss",
                      "train_accuracy", "test_accuracy"])
        for r in runs:
            for t, step, loss, train_acc, test_acc in r["curve"]:
                out.writerow([r["scenario"], r["policy"], f"{t:.4f}", step, f"{loss:.6f}",
                              f"{train_acc:.4f}", f"{test_acc:.4f}"])
    rows = summarise(runs)
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    plot(runs, os.path.join(args.out, "train_digits.png"))

    print("\nFinal loss and accuracy: means over each run's last 10%; 'reaches naive's loss': the first "
          "time worker 0's training loss (mean of its last 5 evaluations) was at or below naive's "
          "final one.")
    print("\n| scenario | policy | rounds | final loss | held-out acc | reaches naive's loss at | vs naive | acc vs naive |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        reach = "never" if r["time_to_naive_loss_s"] is None else f"{r['time_to_naive_loss_s']:.2f} s"
        speed = "" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.2f}x"
        dacc = "" if r["accuracy_vs_naive_pp"] is None else f"{r['accuracy_vs_naive_pp']:+.1f} pp"
        print(f"| {r['scenario']} | {r['policy']} | {r['rounds']} | {r['final_train_loss']:.4f} | "
              f"{100 * r['final_test_accuracy']:.1f}% | {reach} | {speed} | {dacc} |")
    print(f"\nwrote {args.out}/curves.csv, {args.out}/summary.csv, {args.out}/train_digits.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
