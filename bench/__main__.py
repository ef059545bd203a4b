"""``python -m bench [--quick] [--json PATH]``: every figure of the benchmark in one run.

The I/O workloads run interleaved over the targets (snapfs, qsd, direct, snapfs, qsd, ...)
and each figure is the median of ``--runs`` rounds; then the control operations and their
qemu-img peers; then the slow share.  Progress goes to stderr, the markdown table to stdout,
every number to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench import operations as ops
from bench.chains import MIB, build_chain
from bench.fio import WORKLOADS, dd_read, fio
from bench.report import table
from bench.targets import close_all, open_targets, remove

GIB = 1 << 30
FULL = {"size": GIB, "written": 512 * MIB, "depths": [1, 16], "runs": 3, "seconds": 5,
        "rss": (100, 8, 64 * MIB), "merge": 256 * MIB, "snap_count": 9}
QUICK = {"size": 64 * MIB, "written": 32 * MIB, "depths": [1, 4], "runs": 1, "seconds": 1,
         "rss": (4, 3, 8 * MIB), "merge": 16 * MIB, "snap_count": 3}
TARGETS = ["snapfs", "qsd", "direct"]


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def io_figures(work: str, p: dict) -> dict:
    """{depth: {workload: {target: median}}} and the built shares, per depth."""
    out: dict = {}
    for depth in p["depths"]:
        share = os.path.join(work, f"chain-{depth}")
        say(f"building a {p['size'] >> 20} MiB volume with {p['written'] >> 20} MiB written "
            f"over {depth} snapshot(s)")
        build_chain(share, os.path.join(work, f"build-{depth}"), p["size"], p["written"], depth)
        targets = open_targets(share, os.path.join(work, f"targets-{depth}"), TARGETS)
        samples: dict = {w: {t.name: [] for t in targets} for w in [*WORKLOADS, "dd-read"]}
        try:
            for r in range(p["runs"]):
                for w in samples:
                    for t in targets:  # interleaved: A B C A B C ...
                        say(f"depth {depth} round {r + 1}/{p['runs']}: {w} on {t.name}")
                        v = dd_read(t.path) if w == "dd-read" else fio(t.path, w, p["seconds"],
                                                                        p["size"])
                        samples[w][t.name].append(v)
        finally:
            close_all(targets)
        out[depth] = {w: {t: statistics.median(v) for t, v in by.items()}
                      for w, by in samples.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the harness")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "latest.json"))
    ap.add_argument("--workdir", default="/var/tmp", help="where chains are built")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    work = tempfile.mkdtemp(prefix="snapfs-bench-", dir=args.workdir)
    results: dict = {"quick": args.quick, "params": {k: v for k, v in p.items()}}
    try:
        results["io"] = io_figures(work, p)
        share = os.path.join(work, f"chain-{p['depths'][-1]}")
        say("snapshot create latency")
        results["snapshot_ms"] = ops.snapshot_latency(
            os.path.join(work, "op-latency"), {"1 GiB": GIB, "1 TiB": 1 << 40}, p["snap_count"])
        say("writer stall during create and delete")
        results["stall_ms"] = ops.writer_stall(os.path.join(work, "op-stall"), p["size"],
                                               p["written"])
        say("merge against qemu-img commit")
        results["merge_mbs"] = ops.merge_vs_commit(os.path.join(work, "op-merge"), p["size"],
                                                   p["merge"])
        say("clone against qemu-img convert")
        results["clone_mbs"] = ops.clone_vs_convert(os.path.join(work, "op-clone"), share,
                                                    p["size"])
        vols, snaps, vsize = p["rss"]
        say(f"daemon RSS with {vols} volumes x {snaps} snapshots")
        results["rss_mib"] = ops.daemon_rss(os.path.join(work, "op-rss"), vols, snaps, vsize)
        say("slow share (1 ms per share I/O)")
        results["slow_iops"] = ops.slow_share(os.path.join(work, "op-slow"),
                                              os.path.join(work, f"chain-{p['depths'][0]}"),
                                              p["seconds"], p["size"], 1.0)
    finally:
        remove(work)
    for d in list(results["io"]):
        results["io"][str(d)] = results["io"].pop(d)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
