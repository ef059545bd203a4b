"""``python -m bench [--quick] [--json PATH] [--workdir DIR]``: every figure of issue 7 in one
run.

First the I/O workloads on chains of each depth, interleaved over the targets and the depths;
then the control operations and their qemu-img peers; then the slow share.  Progress goes to
stderr, the markdown table to stdout, every number (and each round's sample) to the JSON file.
All mounts are gone and the work directory is removed when this returns, also after an error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench import TOOLS
from bench import operations as ops
from bench.chains import MIB, build_chain
from bench.io_rounds import medians, rounds
from bench.report import SLOW_SEAM, table
from bench.targets import DAEMON_PROBLEMS, KINDS, sweep_mounts

GIB = 1 << 30
FULL = {"size": GIB, "written": 512 * MIB, "depths": [1, 16], "runs": 3, "seconds": 5,
        "snap_count": 9, "merge": 256 * MIB, "rss": [100, 8, 64 * MIB], "slow_delay_ms": 1.0}
QUICK = {"size": 64 * MIB, "written": 32 * MIB, "depths": [1, 4], "runs": 1, "seconds": 1,
         "snap_count": 3, "merge": 16 * MIB, "rss": [4, 3, 8 * MIB], "slow_delay_ms": 1.0}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _first_line(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout.split("\n")[0]


def environment() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "qemu": _first_line("qemu-storage-daemon", "--version"),
            "fio": _first_line("fio", "--version"), "loadavg_start": os.getloadavg()[0]}


def measure_all(work: str, p: dict) -> dict:
    results: dict = {"io": {}, "samples": {}}
    chains = {}
    for depth in p["depths"]:
        share = chains[f"depth {depth}"] = os.path.join(work, f"chain-{depth}")
        say(f"building a {p['size'] // MIB} MiB volume with {p['written'] // MIB} MiB written "
            f"over {depth} snapshot(s)")
        build_chain(share, os.path.join(work, f"build-{depth}"), p["size"], p["written"], depth)
    targets_dir = os.path.join(work, "targets")
    samples = rounds(chains, targets_dir, list(KINDS), p["runs"], p["seconds"], p["size"], say)
    shutil.rmtree(targets_dir)
    for depth in p["depths"]:
        results["samples"][str(depth)] = samples[f"depth {depth}"]
        results["io"][str(depth)] = medians(samples[f"depth {depth}"])
    say(f"snapshot create latency (median of {p['snap_count']})")
    results["snapshot_ms"] = ops.snapshot_latency(
        os.path.join(work, "op-latency"), {"1 GiB": GIB, "1 TiB": 1 << 40}, p["snap_count"])
    say("writer stall during snapshot create and delete")
    results["stall_ms"] = ops.writer_stall(os.path.join(work, "op-stall"), p["size"],
                                           p["written"])
    say(f"merge of a {p['merge'] // MIB} MiB overlay against qemu-img commit "
        f"(median of {p['runs']}, alternating)")
    results["merge_mbs"] = ops.merge_vs_commit(os.path.join(work, "op-merge"), p["size"],
                                               p["merge"], p["runs"])
    deepest = os.path.join(work, f"chain-{p['depths'][-1]}")
    say(f"clone of the depth-{p['depths'][-1]} chain against qemu-img convert "
        f"(median of {p['runs']}, alternating)")
    results["clone_mbs"] = ops.clone_vs_convert(os.path.join(work, "op-clone"), deepest,
                                                p["size"], p["runs"])
    vols, snaps, vsize = p["rss"]
    say(f"daemon RSS with {vols} volumes x {snaps} snapshots")
    results["rss_mib"] = ops.daemon_rss(os.path.join(work, "op-rss"), vols, snaps, vsize)
    say(f"slow share (+{p['slow_delay_ms']:g} ms per share I/O), a volume written in full "
        "under one snapshot")
    results["slow_iops"] = ops.slow_share(os.path.join(work, "op-slow"), p["seconds"],
                                          p["size"], p["slow_delay_ms"])
    if results["slow_iops"] is None:
        say(f"{SLOW_SEAM} (SNAPFS_IO_DELAY_MS had no effect on the daemon)")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: proves the "
                    "harness in under a minute")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "latest.json"), help="where the figures go")
    ap.add_argument("--workdir", default="/var/tmp", help="where the temporary work directory "
                    "is made: its file system holds every share (default /var/tmp)")
    ap.add_argument("--runs", type=int, help="rounds per I/O figure (median)")
    ap.add_argument("--seconds", type=float, help="fio runtime per run")
    args = ap.parse_args(argv)
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        print(f"bench: {', '.join(missing)} missing: run `make bench`, or apt-get install -y "
              f"{' '.join(TOOLS[t] for t in missing)}", file=sys.stderr)
        return 2
    p = dict(QUICK if args.quick else FULL)
    p.update({k: v for k, v in (("runs", args.runs), ("seconds", args.seconds)) if v})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run
    start = time.monotonic()
    results = {"quick": args.quick, "params": p, "env": environment()}
    work = tempfile.mkdtemp(prefix="snapfs-bench-", dir=args.workdir)
    say(f"working in {work}; load average {results['env']['loadavg_start']:.2f} "
        f"on {results['env']['cpus']} CPUs")
    try:
        results.update(measure_all(work, p))
    finally:
        left = sweep_mounts(work)
        if left:
            print(f"bench: unmounted leftovers lazily: {left}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    results["env"]["loadavg_end"] = os.getloadavg()[0]
    results["seconds_total"] = round(time.monotonic() - start, 1)
    results["daemon_problems"] = DAEMON_PROBLEMS
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    say(f"done in {results['seconds_total']:.0f} s; figures in {args.json}"
        + (f"; {len(DAEMON_PROBLEMS)} snapfs log warnings/errors (in the JSON)"
           if DAEMON_PROBLEMS else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
