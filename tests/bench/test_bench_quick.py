"""The benchmark harness works (``python -m bench --quick``): every workload is measured on
every target, the table and the JSON come out, and nothing stays mounted.  Timing is never
judged here; only that each figure exists and is positive."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from bench import TOOLS
from bench.targets import KINDS, sweep_mounts
from bench.workloads import WORKLOADS
from tests.mount.conftest import REPO, require_fuse

TIMEOUT = 180  # seconds; the quick bench takes about one minute here


def require_tools() -> None:
    """Fail (never skip) without the peers: `make test` and `make bench` install them."""
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run `make bench` (or `make test`), "
                           f"or apt-get install -y {' '.join(TOOLS[t] for t in missing)}")


def test_quick_bench(tmp_path):
    require_fuse()
    require_tools()
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--json", str(out),
                             "--workdir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench unmounts what it mounted on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"the quick bench ran over {TIMEOUT} s: {stderr[-3000:]}")
    finally:
        with open("/proc/mounts") as f:
            left = str(tmp_path) in f.read()
        sweep_mounts(str(tmp_path))  # a stale mount would break the next run
    assert not left, "the bench left a mount behind"
    assert proc.returncode == 0, stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["io"]) == {"1", "4"}
    for depth, by_workload in res["io"].items():
        assert set(by_workload) == set(WORKLOADS)
        for w, by_target in by_workload.items():
            assert set(by_target) == set(KINDS), (depth, w)
            assert all(v > 0 for v in by_target.values()), (depth, w, by_target)
    assert set(res["snapshot_ms"]) == {"1 GiB", "1 TiB"}
    assert all(v > 0 for v in res["snapshot_ms"].values())
    assert set(res["stall_ms"]) == {"create", "delete"}
    assert all(v > 0 for v in res["stall_ms"].values())
    for key in ("merge_mbs", "clone_mbs"):
        assert res[key]["snapfs"] > 0 and res[key]["qemu-img"] > 0
    assert res["rss_mib"] > 10
    assert res["slow_iops"]["qd1"] > 0 and res["slow_iops"]["qd16"] > 0
    table = stdout
    assert table.startswith("| figure | snapfs | qsd | direct | snapfs/qsd | snapfs/direct |")
    for figure in ("rand-read-4K-qd16 depth 4 (IOPS)", "snapshot create", "writer stall",
                   "qemu-img commit", "qemu-img convert", "daemon RSS", "slow share"):
        assert figure in table
    assert not list(tmp_path.glob("snapfs-bench-*")), "the bench left its work directory"
