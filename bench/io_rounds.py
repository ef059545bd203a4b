"""The I/O workloads over every target and chain, interleaved (snapfs, qsd, direct, snapfs,
...), so that noise from the machine hits every target and chain alike; each figure is the
median of the rounds.

Read workloads share one copy of the chain per target.  Every write run gets a fresh copy:
a timed 1 MiB writer covers the whole volume within a second, and later reads (or writes)
on it would no longer go through the chain being measured.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
from typing import Callable

from bench.targets import serving
from bench.workloads import WORKLOADS, measure


def settle(path: str) -> None:
    """Write back the previous run's dirty pages first (only the file system holding
    ``path``: a global sync could block on a foreign FUSE mount)."""
    subprocess.run(["sync", "-f", path], check=True)


def rounds(chains: dict[str, str], work: str, names: list[str], runs: int, seconds: float,
           size: int, say: Callable[[str], None]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """{chain: {workload: {target: [one figure per round]}}} for the chains (label -> share).

    The chains are interleaved too (every round runs each workload on each chain in turn):
    the machine's speed drifts over minutes, and a chain measured only after another would
    carry that drift into the comparison between them (the cost of depth)."""
    samples: dict = {c: {w: {n: [] for n in names} for w in WORKLOADS} for c in chains}
    reads = [w for w, spec in WORKLOADS.items() if not spec.writes]
    writes = [w for w, spec in WORKLOADS.items() if spec.writes]
    with contextlib.ExitStack() as stack:
        served = {c: stack.enter_context(serving(share, os.path.join(work, f"{c}-reads"), names))
                  for c, share in chains.items()}
        for r in range(runs):
            for w in reads:
                for c, targets in served.items():
                    for t in targets:
                        say(f"round {r + 1}/{runs}: {w} on {t.name}, {c}")
                        settle(work)
                        samples[c][w][t.name].append(measure(w, t.path, t.fuse, seconds, size))
    for r in range(runs):
        for w in writes:
            for c, share in chains.items():
                for name in names:
                    say(f"round {r + 1}/{runs}: {w} on {name}, {c} (fresh copy)")
                    d = os.path.join(work, f"{c}-{w}-{r}")
                    with serving(share, d, [name]) as [t]:
                        settle(work)
                        samples[c][w][name].append(measure(w, t.path, t.fuse, seconds, size))
                    shutil.rmtree(d)
    return samples


def medians(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {w: {t: statistics.median(v) for t, v in by.items()} for w, by in samples.items()}
