"""Thin wrappers over qemu-img and qemu-io, the oracle every engine test is measured against."""

from __future__ import annotations

import json
import shutil
import subprocess

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def require() -> None:
    """Fail loudly (never skip) when the oracle is missing: `make test` installs it."""
    if not QEMU_IMG or not QEMU_IO:
        raise RuntimeError("qemu-img/qemu-io not found: run `make test`, which installs qemu-utils")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    require()
    return run(QEMU_IMG, *args, check=check)


def io(path: str, *cmds: str, fmt: str = "qcow2") -> str:
    """Run qemu-io commands on an image (writable)."""
    require()
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    out = run(*argv)
    if "error" in out.stdout.lower() or "failed" in out.stdout.lower():
        raise RuntimeError(f"qemu-io {cmds}: {out.stdout}")
    return out.stdout


def create(path: str, size: int | str, *opts: str, fmt: str = "qcow2",
           backing: str | None = None, backing_fmt: str | None = None) -> None:
    argv = ["create", "-q", "-f", fmt]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    for o in opts:
        argv += ["-o", o]
    argv += [path, str(size)]
    img(*argv)


def to_raw(path: str, out: str, fmt: str | None = None) -> bytes:
    """The guest-visible content of an image through its chain, as qemu-img sees it."""
    argv = ["convert", "-U", "-O", "raw"]
    if fmt:
        argv += ["-f", fmt]
    img(*argv, path, out)
    with open(out, "rb") as f:
        return f.read()


def check(path: str, fmt: str = "qcow2") -> tuple[int, dict]:
    """qemu-img check: (exit code, parsed JSON). 0 clean, 2 corrupt, 3 leaks."""
    out = img("check", "-U", "-f", fmt, "--output=json", path, check=False)
    try:
        data = json.loads(out.stdout) if out.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {"raw": out.stdout, "stderr": out.stderr}
    data.setdefault("stderr", out.stderr)
    return out.returncode, data


def info(path: str) -> dict:
    return json.loads(img("info", "-U", "--output=json", path).stdout)


def map_(path: str) -> list[dict]:
    return json.loads(img("map", "-U", "--output=json", path).stdout)
