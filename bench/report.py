"""The results as one markdown table, each figure next to the target issue 7 sets for it."""

from __future__ import annotations

from bench.workloads import WORKLOADS

#: workload -> minimum snapfs/qsd ratio
IO_TARGETS = {"seq-read-1M": 2.0, "seq-write-1M": 1.5, "rand-read-4K-qd1": 0.8,
              "rand-read-4K-qd16": 0.8, "rand-write-4K-fsync32": 0.8}
DEPTH_COST = 1.10
SNAPSHOT_MS, STALL_MS, RSS_MIB, SLOW_SCALING = 20.0, 50.0, 150.0, 8.0
SLOW_SEAM = "slow share: needs SNAPFS_IO_DELAY seam"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _row(figure: str, snapfs: str, target: str = "", met: str = "", qsd: str = "",
         direct: str = "", vs_qsd: str = "", vs_direct: str = "") -> str:
    return f"| {figure} | {snapfs} | {qsd} | {direct} | {vs_qsd} | {vs_direct} | {target} | {met} |"


def table(r: dict) -> str:
    lines = ["| figure | snapfs | qsd | direct | snapfs/qsd | snapfs/direct | target | |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    depths = sorted(r["io"], key=int)
    for d in depths:
        for w, by in r["io"][d].items():
            s, q, x = by["snapfs"], by["qsd"], by["direct"]
            goal = IO_TARGETS.get(w)
            lines.append(_row(f"{w} depth {d} ({WORKLOADS[w].unit})", _num(s), qsd=_num(q),
                              direct=_num(x), vs_qsd=f"{s / q:.2f}x", vs_direct=f"{s / x:.2f}x",
                              target=f">= {goal}x qsd" if goal else "",
                              met=_met(s / q >= goal) if goal else ""))
    first, last = depths[0], depths[-1]
    for w in WORKLOADS:
        # qsd's and the raw file's own figure for the same two chains in the same rounds:
        # what the chains' layout and the machine's drift contribute, next to snapfs's
        cost = {t: r["io"][first][w][t] / r["io"][last][w][t] for t in r["io"][first][w]}
        lines.append(_row(f"{w}: cost at depth {last} / depth {first} (qsd, direct: their own)",
                          f"{cost['snapfs']:.2f}x", f"<= {DEPTH_COST}x",
                          _met(cost["snapfs"] <= DEPTH_COST), qsd=f"{cost['qsd']:.2f}x",
                          direct=f"{cost['direct']:.2f}x"))
    for size, ms in r["snapshot_ms"].items():
        lines.append(_row(f"snapshot create, {size} sparse volume (ms, median)", f"{ms:.1f}",
                          f"<= {SNAPSHOT_MS:g} ms", _met(ms <= SNAPSHOT_MS)))
    for op, ms in r["stall_ms"].items():
        lines.append(_row(f"longest 4K writer stall during snapshot {op} (ms)", f"{ms:.1f}",
                          f"<= {STALL_MS:g} ms", _met(ms <= STALL_MS)))
    for what, peer, key in (("merge (delete-snapshot)", "qemu-img commit -d + rm + rebase -u", "merge_mbs"),
                            ("clone", "qemu-img convert", "clone_mbs")):
        ours, theirs = r[key]["snapfs"], r[key]["qemu-img"]
        lines.append(_row(f"{what} vs {peer} (MB/s; qsd column: qemu-img)", _num(ours),
                          ">= 1.0x qemu-img", _met(ours >= theirs), qsd=_num(theirs),
                          vs_qsd=f"{ours / theirs:.2f}x"))
    vols, snaps, _ = r["params"]["rss"]
    lines.append(_row(f"daemon RSS, {vols} volumes x {snaps} snapshots (MiB)",
                      f"{r['rss_mib']:.0f}", f"<= {RSS_MIB:g} MiB", _met(r["rss_mib"] <= RSS_MIB)))
    figure = "slow share (+1 ms per share I/O): rand-read-4K IOPS qd1 / qd16"
    slow = r["slow_iops"]
    if slow is None:
        lines.append(_row(figure, f"not measured ({SLOW_SEAM})", f">= {SLOW_SCALING:g}x qd1",
                          "n/a"))
    else:
        scale = slow["qd16"] / slow["qd1"]
        lines.append(_row(figure, f"{_num(slow['qd1'])} / {_num(slow['qd16'])} ({scale:.1f}x)",
                          f"qd16 >= {SLOW_SCALING:g}x qd1", _met(scale >= SLOW_SCALING)))
    return "\n".join(lines)
