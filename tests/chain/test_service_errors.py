"""Bad control requests (CONTRACT.md sections 3 and 5): the contract's errno, and nothing changed.

Every case runs on a fresh copy of one prepared share:

- ``r1``: a raw volume (4 MiB) with data, never snapshotted (no ``.info``);
- ``q1``: a qcow2 volume (4 MiB) with data, snapshot ``s1``, more data after it;
- ``stray.img``: a raw file no volume owns (1 MiB, some data);
- ``backed.qcow2``: a qcow2 file backing onto ``stray.img`` (made by qemu-img).

A refused request must raise ``SnapfsError`` with the contract's errno (``.errno`` and
``.errno_name``) and a one-line message, and leave every file under the share -- ``.snapfs/``
included, the lease files under ``.snapfs/owners`` and ``.snapfs/hosts`` excepted (they say
which daemon serves a volume, not what the volume holds) -- byte for byte as it was (names, types
and sha256).  The requests that the contract makes idempotent successes (``create-volume``
again with the same size and format, ``create-snapshot`` again, ``delete-snapshot`` of a
missing snapshot, ``delete-volume`` of a missing volume, ``extend-volume`` to the same size)
must succeed and change nothing either.  After each case the service still serves the volumes
and reports none of them failed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from snapfs.chain.service import VolumeService
from snapfs.errors import SnapfsError
from tests import qemu

MIB = 1 << 20
SIZE = 4 * MIB


@contextlib.asynccontextmanager
async def serving(root: Path):
    """``VolumeService(root).running()``, failing loudly should it ever lose an exception
    raised inside it (an earlier version did, which hid failed assertions)."""
    svc = VolumeService(str(root))
    finished = False
    async with svc.running():
        yield svc
        finished = True
    assert finished, "VolumeService.running() swallowed an exception raised inside it"


# --------------------------------------------------------------------------------------------
# the prepared share
# --------------------------------------------------------------------------------------------


async def build(root: Path) -> None:
    async with serving(root) as svc:
        await svc.handle({"op": "create-volume", "volume": "r1", "size": SIZE, "format": "raw"})
        await svc.handle({"op": "create-volume", "volume": "q1", "size": SIZE, "format": "qcow2"})
        for vid in ("r1", "q1"):
            vol = await svc.volume(vid)
            await vol.write(0, b"R" * 70000 if vid == "r1" else b"Q" * 70000)
            await vol.write(SIZE - 1000, b"e" * 1000)
            await vol.flush()
            await svc.release(vid)
        await svc.handle({"op": "create-snapshot", "volume": "q1", "snapshot": "s1"})
        vol = await svc.volume("q1")
        await vol.write(4096, b"after" * 1000)
        await vol.flush()
        await svc.release("q1")
    with open(root / "stray.img", "wb") as f:
        f.truncate(MIB)
        f.write(b"stray data" * 100)
    qemu.create(str(root / "backed.qcow2"), MIB, backing="stray.img", backing_fmt="raw")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    import trio
    root = tmp_path_factory.mktemp("template") / "share"
    root.mkdir()
    trio.run(build, root)
    return root


@pytest.fixture
def share(template: Path, tmp_path: Path) -> Path:
    d = tmp_path / "share"
    shutil.copytree(template, d)
    return d


def fingerprint(root: Path) -> dict[str, str]:
    """Every file and directory under the share with its sha256 (lease files left out)."""
    out = {}
    leases = {os.path.join(".snapfs", d) for d in ("owners", "hosts")}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel in leases:
            continue
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.normpath(os.path.join(rel, n))] = hashlib.sha256(f.read()).hexdigest()
    for d in leases:
        out.pop(d, None)
    return out


def diff(before: dict, after: dict) -> str:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"removed {gone}, created {new}, changed {changed}"


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------

#: A valid request per op (on the prepared share); the generic cases break one thing in it.
VALID = {
    "create-volume": {"volume": "new1", "size": SIZE},
    "delete-volume": {"volume": "r1"},
    "extend-volume": {"volume": "r1", "size": 2 * SIZE},
    "create-snapshot": {"volume": "r1", "snapshot": "x1"},
    "delete-snapshot": {"volume": "q1", "snapshot": "s1"},
    "clone": {"volume": "new1", "source_volume": "q1"},
    "revert": {"volume": "q1", "snapshot": "s1"},
    "manage": {"volume": "new1", "source": "stray.img", "format": "raw"},
    "info": {"volume": "q1"},
    "list": {},
}
REQUIRED = {
    "create-volume": ("volume", "size"),
    "delete-volume": ("volume",),
    "extend-volume": ("volume", "size"),
    "create-snapshot": ("volume", "snapshot"),
    "delete-snapshot": ("volume", "snapshot"),
    "clone": ("volume", "source_volume"),
    "revert": ("volume", "snapshot"),
    "manage": ("volume", "source", "format"),
    "info": ("volume",),
    "list": (),
}
BAD_IDS = ["a.b", "a/b", "../r1", "a b", "", " ", "r1\n", "r1/", "..", ".", "r\x001", "é",
           5, 1.5, None, True, ["r1"], {"id": "r1"}]
BAD_SIZES = ["4194304", 4194304.0, True, False, None, [SIZE], 4194305, SIZE + 1000, 1000, 511, 0,
             -512, -SIZE]
BAD_FORMATS = ["qcow3", "RAW", "Qcow2", "vmdk", "", 1, ["raw"]]


def cases():
    out = []

    def add(name, request, want):
        out.append(pytest.param(request, want, id=name))

    # requests that are no request at all
    for bad in ([], "create-volume", None, 42):
        add(f"not-an-object-{type(bad).__name__}", bad, "EINVAL")
    add("no-op", {"volume": "r1"}, "EINVAL")
    for op in ("frobnicate", "", "Create-Volume", "create_volume", "createvolume", None, 1,
               ["info"], "info "):
        add(f"unknown-op-{op!r}", {"op": op, "volume": "r1"}, "EINVAL")

    for op, valid in VALID.items():
        add(f"{op}-unknown-key", {"op": op, **valid, "bogus": 1}, "EINVAL")
        add(f"{op}-unknown-key-dashed", {"op": op, **valid, "source-volume": "q1"}, "EINVAL")
        for key in REQUIRED[op]:
            req = {"op": op, **valid}
            del req[key]
            add(f"{op}-missing-{key}", req, "EINVAL")
        for key in ("volume", "source_volume"):
            if key in valid:
                add(f"{op}-{key}-prefixed", {"op": op, **valid, key: "volume-" + valid[key]},
                    "EINVAL")
                for i, bad in enumerate(BAD_IDS):
                    add(f"{op}-{key}-bad-{i}", {"op": op, **valid, key: bad}, "EINVAL")
        if "snapshot" in valid:
            for i, bad in enumerate(BAD_IDS):
                add(f"{op}-snapshot-bad-{i}", {"op": op, **valid, "snapshot": bad}, "EINVAL")
        if op in ("create-volume", "extend-volume", "clone"):
            for i, bad in enumerate(BAD_SIZES):
                if bad is None and op == "clone":
                    continue  # null for an optional argument may well mean "the default"
                add(f"{op}-size-bad-{i}", {"op": op, **valid, "size": bad}, "EINVAL")
        if op in ("create-volume", "clone", "manage"):
            for i, bad in enumerate(BAD_FORMATS):
                add(f"{op}-format-bad-{i}", {"op": op, **valid, "format": bad}, "EINVAL")
    for i, bad in enumerate(BAD_IDS):
        if bad is None:
            continue  # null for an optional argument may well mean "none"
        add(f"clone-source_snapshot-bad-{i}",
            {"op": "clone", "volume": "new1", "source_volume": "q1", "source_snapshot": bad},
            "EINVAL")
    for i, bad in enumerate(["", "a/b", "../stray.img", "/etc/passwd", ".snapfs", "stray.img/",
                             5, None, ["stray.img"]]):
        add(f"manage-source-bad-{i}",
            {"op": "manage", "volume": "new1", "source": bad, "format": "raw"}, "EINVAL")

    # state conflicts
    add("extend-shrink-raw", {"op": "extend-volume", "volume": "r1", "size": SIZE // 2}, "EINVAL")
    add("extend-shrink-qcow2", {"op": "extend-volume", "volume": "q1", "size": 512}, "EINVAL")
    add("extend-shrink-by-512", {"op": "extend-volume", "volume": "q1", "size": SIZE - 512},
        "EINVAL")
    add("delete-volume-with-snapshots", {"op": "delete-volume", "volume": "q1"}, "EBUSY")
    add("create-volume-other-size",
        {"op": "create-volume", "volume": "r1", "size": 2 * SIZE, "format": "raw"}, "EEXIST")
    add("create-volume-smaller", {"op": "create-volume", "volume": "q1", "size": MIB,
                                  "format": "qcow2"}, "EEXIST")
    add("create-volume-other-format",
        {"op": "create-volume", "volume": "r1", "size": SIZE, "format": "qcow2"}, "EEXIST")
    add("create-volume-other-format-qcow2",
        {"op": "create-volume", "volume": "q1", "size": SIZE, "format": "raw"}, "EEXIST")
    add("create-volume-default-format-differs",  # the default format is raw
        {"op": "create-volume", "volume": "q1", "size": SIZE}, "EEXIST")

    # missing things
    for op, extra in (("info", {}), ("extend-volume", {"size": 2 * SIZE}),
                      ("create-snapshot", {"snapshot": "x1"}), ("revert", {"snapshot": "s1"})):
        add(f"{op}-missing-volume", {"op": op, "volume": "ghost", **extra}, "ENOENT")
    add("revert-missing-snapshot", {"op": "revert", "volume": "q1", "snapshot": "nope"}, "ENOENT")
    add("revert-never-snapshotted", {"op": "revert", "volume": "r1", "snapshot": "s1"}, "ENOENT")
    add("clone-onto-existing", {"op": "clone", "volume": "r1", "source_volume": "q1"}, "EEXIST")
    add("clone-onto-existing-from-snapshot",
        {"op": "clone", "volume": "r1", "source_volume": "q1", "source_snapshot": "s1"}, "EEXIST")
    add("clone-onto-existing-qcow2",
        {"op": "clone", "volume": "q1", "source_volume": "r1", "format": "qcow2"}, "EEXIST")
    add("clone-missing-volume", {"op": "clone", "volume": "new1", "source_volume": "ghost"},
        "ENOENT")
    add("clone-missing-snapshot",
        {"op": "clone", "volume": "new1", "source_volume": "q1", "source_snapshot": "nope"},
        "ENOENT")
    add("clone-missing-snapshot-no-info",
        {"op": "clone", "volume": "new1", "source_volume": "r1", "source_snapshot": "s1"},
        "ENOENT")
    add("clone-missing-volume-and-snapshot",
        {"op": "clone", "volume": "new1", "source_volume": "ghost", "source_snapshot": "s1"},
        "ENOENT")
    add("clone-smaller", {"op": "clone", "volume": "new1", "source_volume": "q1",
                          "size": SIZE // 2}, "EINVAL")
    add("clone-smaller-by-512", {"op": "clone", "volume": "new1", "source_volume": "r1",
                                 "size": SIZE - 512, "format": "qcow2"}, "EINVAL")
    add("clone-smaller-than-snapshot",
        {"op": "clone", "volume": "new1", "source_volume": "q1", "source_snapshot": "s1",
         "size": MIB}, "EINVAL")
    add("manage-backed-qcow2",
        {"op": "manage", "volume": "new1", "source": "backed.qcow2", "format": "qcow2"}, "EINVAL")
    add("manage-missing-file",
        {"op": "manage", "volume": "new1", "source": "nothere.img", "format": "raw"}, "ENOENT")
    add("manage-onto-existing",
        {"op": "manage", "volume": "r1", "source": "stray.img", "format": "raw"}, "EEXIST")
    for i, bad in enumerate(["yes", "true", 1, 0, None, [], {}]):
        add(f"list-unmanaged-bad-{i}", {"op": "list", "unmanaged": bad}, "EINVAL")

    # idempotent successes that must change nothing
    add("create-volume-again-raw",
        {"op": "create-volume", "volume": "r1", "size": SIZE, "format": "raw"}, None)
    add("create-volume-again-default-format", {"op": "create-volume", "volume": "r1",
                                               "size": SIZE}, None)
    add("create-volume-again-qcow2",
        {"op": "create-volume", "volume": "q1", "size": SIZE, "format": "qcow2"}, None)
    add("create-snapshot-again", {"op": "create-snapshot", "volume": "q1", "snapshot": "s1"},
        None)
    add("delete-missing-snapshot", {"op": "delete-snapshot", "volume": "q1", "snapshot": "nope"},
        None)
    add("delete-missing-snapshot-no-info",
        {"op": "delete-snapshot", "volume": "r1", "snapshot": "nope"}, None)
    add("delete-missing-volume", {"op": "delete-volume", "volume": "ghost"}, None)
    add("extend-same-size-raw", {"op": "extend-volume", "volume": "r1", "size": SIZE}, None)
    add("extend-same-size-qcow2", {"op": "extend-volume", "volume": "q1", "size": SIZE}, None)
    add("info", {"op": "info", "volume": "q1"}, None)
    add("list", {"op": "list"}, None)
    add("list-managed", {"op": "list", "unmanaged": False}, None)
    add("list-unmanaged", {"op": "list", "unmanaged": True}, None)
    return out


async def sanity(svc: VolumeService) -> None:
    """The service still serves both volumes, with their snapshot, and none is failed."""
    assert not svc.failed, svc.failed
    q1 = await svc.handle({"op": "info", "volume": "q1"})
    assert q1["state"] == "ok" and q1["size"] == SIZE
    assert [s["id"] for s in q1["snapshots"]] == ["s1"]
    r1 = await svc.handle({"op": "info", "volume": "r1"})
    assert r1["state"] == "ok" and r1["size"] == SIZE and r1["snapshots"] == []
    vol = await svc.volume("q1")
    assert await vol.read(0, 5) == b"QQQQQ" and await vol.read(4096, 5) == b"after"
    await svc.release("q1")


@pytest.mark.parametrize("request_, want", cases())
async def test_bad_request_changes_nothing(share: Path, request_, want) -> None:
    async with serving(share) as svc:
        before = fingerprint(share)
        if want is None:
            await svc.handle(request_)
        else:
            with pytest.raises(SnapfsError) as ei:
                await svc.handle(request_)
            err = ei.value
            assert err.errno_name == want, \
                f"{request_}: {err.errno_name} ({err.message}), want {want}"
            assert err.errno == getattr(errno, want)
            assert err.message and "\n" not in err.message, repr(err.message)
        await svc.wait_idle()
        after = fingerprint(share)
        assert after == before, f"{request_} changed the share: {diff(before, after)}"
        await sanity(svc)


@pytest.mark.parametrize("request_", [
    {"op": "clone", "volume": "q1", "source_volume": "q1"},
    {"op": "clone", "volume": "q1", "source_volume": "q1", "source_snapshot": "s1"},
    {"op": "manage", "volume": "new1", "source": "volume-r1", "format": "raw"},
    {"op": "manage", "volume": "new1", "source": "volume-q1.s1", "format": "qcow2"},
    {"op": "manage", "volume": "new1", "source": "volume-q1.info", "format": "raw"},
], ids=["clone-onto-itself", "clone-onto-itself-snapshot", "manage-a-volume-base",
        "manage-a-volume-overlay", "manage-an-info"])
async def test_refused_either_way(share: Path, request_) -> None:
    """Requests the contract refuses without naming the errno: refused, nothing changed."""
    async with serving(share) as svc:
        before = fingerprint(share)
        with pytest.raises(SnapfsError) as ei:
            await svc.handle(request_)
        assert ei.value.errno_name in ("EINVAL", "EEXIST", "EBUSY"), ei.value.message
        after = fingerprint(share)
        assert after == before, f"{request_} changed the share: {diff(before, after)}"
        await sanity(svc)


async def test_list(share: Path) -> None:
    (share / "sub").mkdir()  # directories are no files to manage
    os.symlink("stray.img", share / "link.img")  # nor are symlinks
    async with serving(share) as svc:
        before = fingerprint(share)
        assert await svc.handle({"op": "list"}) == {"volumes": ["q1", "r1"]}
        res = await svc.handle({"op": "list", "unmanaged": True})
        assert sorted(res) == ["unmanaged"]
        got = sorted((e["name"], e["size"]) for e in res["unmanaged"])
        assert got == [("backed.qcow2", os.path.getsize(share / "backed.qcow2")),
                       ("stray.img", MIB)], got
        assert fingerprint(share) == before


async def test_idempotent_create_volume_result(share: Path) -> None:
    async with serving(share) as svc:
        res = await svc.handle({"op": "create-volume", "volume": "q1", "size": SIZE,
                                "format": "qcow2"})
        assert res["volume"] == "q1" and res["size"] == SIZE


async def test_refused_delete_volume_leaves_the_merge_running(share: Path) -> None:
    """delete-volume refused with EBUSY (snapshots left) while the merge of a just deleted
    snapshot runs in the background: the refusal changes nothing, the merge still completes."""
    async with serving(share) as svc:
        await svc.handle({"op": "create-snapshot", "volume": "q1", "snapshot": "s2"})
        vol = await svc.volume("q1")
        await vol.write(0, b"z" * 512)
        await vol.flush()
        await svc.release("q1")
        await svc.handle({"op": "delete-snapshot", "volume": "q1", "snapshot": "s2"})
        with pytest.raises(SnapfsError) as ei:
            await svc.handle({"op": "delete-volume", "volume": "q1"})  # s1 is left
        assert ei.value.errno_name == "EBUSY", ei.value.message
        await svc.wait_idle()
        assert not svc.failed, svc.failed
        assert os.listdir(share / ".snapfs" / "intents") == [], "the merge was abandoned"
        files = sorted(n for n in os.listdir(share) if n.startswith("volume-q1"))
        assert files == ["volume-q1", "volume-q1.info", "volume-q1.s1"], files
        assert svc.share.read_info("q1") == {"active": "volume-q1.s1", "s1": "volume-q1.s1"}
        vol = await svc.volume("q1")
        assert await vol.read(0, 5) == b"zzzzz" and await vol.read(4096, 5) == b"after"
        await svc.release("q1")
