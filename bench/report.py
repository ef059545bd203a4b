"""The results as one markdown table, each figure next to the target it must meet."""

from __future__ import annotations

from bench.fio import WORKLOADS

#: workload -> minimum snapfs/qsd ratio
IO_TARGETS = {"seq-read-1M": 2.0, "seq-write-1M": 1.5, "rand-read-4K-qd1": 0.8,
              "rand-read-4K-qd16": 0.8, "rand-write-4K-fsync32": 0.8}
DEPTH_COST = 1.10
SNAPSHOT_MS, STALL_MS, RSS_MIB, SLOW_SCALING = 20.0, 50.0, 150.0, 8.0


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(r: dict) -> str:
    lines = ["| figure | snapfs | qsd | direct | snapfs/qsd | snapfs/direct | target | |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    depths = sorted(r["io"], key=int)
    for d in depths:
        for w, by in r["io"][d].items():
            unit = WORKLOADS[w][1] if w in WORKLOADS else "MB/s"
            s, q, x = by["snapfs"], by["qsd"], by["direct"]
            goal = IO_TARGETS.get(w)
            lines.append(f"| {w} depth {d} ({unit}) | {_num(s)} | {_num(q)} | {_num(x)} | "
                         f"{s / q:.2f}x | {s / x:.2f}x | "
                         + (f">= {goal}x qsd | {_met(s / q >= goal)} |" if goal else "| |"))
    first, last = depths[0], depths[-1]
    for w in IO_TARGETS:
        cost = r["io"][first][w]["snapfs"] / r["io"][last][w]["snapfs"]
        lines.append(f"| {w}: depth {last} cost vs depth {first} | {cost:.2f}x | | | | | "
                     f"<= {DEPTH_COST}x | {_met(cost <= DEPTH_COST)} |")
    for size, ms in r["snapshot_ms"].items():
        lines.append(f"| snapshot create, {size} volume (ms, median) | {ms:.1f} | | | | | "
                     f"<= {SNAPSHOT_MS:g} ms | {_met(ms <= SNAPSHOT_MS)} |")
    for op, ms in r["stall_ms"].items():
        lines.append(f"| longest 4K writer stall during snapshot {op} (ms) | {ms:.1f} | | | | | "
                     f"<= {STALL_MS:g} ms | {_met(ms <= STALL_MS)} |")
    for what, peer, key in (("merge (delete-snapshot)", "qemu-img commit", "merge_mbs"),
                            ("clone", "qemu-img convert", "clone_mbs")):
        ours, theirs = r[key]["snapfs"], r[key]["qemu-img"]
        lines.append(f"| {what} vs {peer} (MB/s) | {_num(ours)} | {_num(theirs)} (qemu-img) "
                     f"| | {ours / theirs:.2f}x | | >= 1.0x | {_met(ours >= theirs)} |")
    vols, snaps, _ = r["params"]["rss"]
    lines.append(f"| daemon RSS, {vols} volumes x {snaps} snapshots (MiB) | "
                 f"{r['rss_mib']:.0f} | | | | | <= {RSS_MIB:g} MiB | "
                 f"{_met(r['rss_mib'] <= RSS_MIB)} |")
    slow = r["slow_iops"]
    scale = slow["qd16"] / slow["qd1"]
    lines.append(f"| slow share (1 ms/IO) rand-read-4K IOPS qd1 / qd16 | {_num(slow['qd1'])} / "
                 f"{_num(slow['qd16'])} ({scale:.1f}x) | | | | | qd16 >= {SLOW_SCALING:g}x qd1 "
                 f"| {_met(scale >= SLOW_SCALING)} |")
    return "\n".join(lines)
