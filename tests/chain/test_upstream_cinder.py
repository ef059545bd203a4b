"""snapfs and upstream OpenStack Cinder's NFS driver share one share directory (CONTRACT.md 1).

Upstream is the real ``cinder`` package from PyPI (``REQUIREMENT`` below, part of the project's
test extra): ``cinder.volume.drivers.nfs.NfsDriver`` runs OFFLINE on a temporary directory that
stands in for the mounted NFS share.  Only what needs a cloud is replaced:

- mounting: the driver's ``_ensure_share_mounted`` (there is no NFS server),
  ``_get_mount_point_for_share`` (the "mount point" is the temporary share directory) and the
  ``mount.nfs`` presence probe ``do_setup`` runs;
- the database: ``objects.Volume.save`` and ``objects.Snapshot.save`` do nothing (the volumes
  and snapshots are real ``cinder.objects`` with a real admin ``RequestContext``; their fields,
  admin metadata included, live in memory as upstream sets them);
- Nova: ``compute.API`` returns a stand-in that fails on any use; every volume is detached
  (``attach_status='detached'``), so upstream takes its offline (qemu-img) paths.

Everything else is upstream's code as it runs in production: ``qemu-img create/rebase/commit/
info`` really run (as root, so processutils adds no root helper; a non-root run uses ``env`` as
the root helper instead of sudo/rootwrap), the privsep'd format inspector runs in-process
(privsep client mode off), ``@coordination.synchronized`` takes real tooz file locks under the
test's tmp directory.

1. Shares written by upstream (raw base with ``nfs_qcow2_volumes=False``, qcow2 base with
   ``nfs_qcow2_volumes=True``; ``nfs_snapshot_support=True``): volumes with data written by
   qemu-io between upstream snapshots, snapshots deleted by upstream (oldest, middle, latest),
   a volume whose snapshots are all gone, a volume that never had one.  snapfs then serves
   exactly what qemu-img sees (and what was written), reports upstream's snapshots in
   ``info``/``list``, and takes and deletes snapshots of its own on that share.
2. Shares written by snapfs stay valid for upstream (UUID-shaped ids): upstream's
   ``_read_info_file``/``_qemu_img_info`` (with its backing-file name check) accept every file,
   its offline ``delete_snapshot`` works on snapfs's snapshots (middle, latest, last) and leaves
   the right content, ``qemu-img check`` passes on every file, and snapfs serves the result.

Volumes are 1 GiB (upstream sizes volumes in whole GiB) and sparse; content is compared over the
whole virtual size, chunk by chunk, against qemu-img and against a model of the writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import uuid
import warnings
from pathlib import Path
from unittest import mock

import pytest

from tests import qemu

#: The pip requirement of the upstream Cinder these tests run against (the test extra's pin).
REQUIREMENT = "cinder==29.0.0"

GiB = 1 << 30
VSIZE = GiB            # volume.size = 1 (GiB), the smallest Cinder volume
CHUNK = 4 << 20
ZERO = bytes(CHUNK)
SHARE = "nfs-host.example:/export/snapfs"

pytestmark = [
    pytest.mark.slow,
    # Upstream's own noise: eventlet's warning on every fork processutils makes, oslo's
    # deprecations.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


# --------------------------------------------------------------------------------------------
# The model: what the guest wrote, replayed to give the expected bytes of any range
# --------------------------------------------------------------------------------------------

class Model:
    def __init__(self, size: int = VSIZE):
        self.size = size
        self.writes: list[tuple[int, int, int]] = []  # (offset, length, byte value; 0 = zeroes)

    def add(self, off: int, length: int, pattern: int) -> None:
        assert 0 <= off and off + length <= self.size
        self.writes.append((off, length, pattern))

    def copy(self) -> "Model":
        return copy.deepcopy(self)

    def chunk(self, start: int, length: int) -> bytes:
        end = start + length
        hits = [(o, n, p) for o, n, p in self.writes if o < end and start < o + n]
        if not hits:
            return ZERO[:length] if length != CHUNK else ZERO
        buf = bytearray(length)
        for off, n, pat in hits:
            lo, hi = max(off, start), min(off + n, end)
            buf[lo - start:hi - start] = bytes([pat]) * (hi - lo)
        return bytes(buf)


def step_writes(i: int) -> list[tuple[int, int, int]]:
    """Step ``i``'s writes: unaligned, across cluster boundaries, overlapping earlier steps,
    at the very end of the device, and zero writes that hide data of the step before."""
    pat = 0x11 * (i % 15 + 1)
    w = [
        (512 + i * 4096, 3000, pat),                          # near the start, overlapping
        (65536 * (3 + i) - 1000, 5000, pat),                  # across a cluster boundary
        ((300 << 20) + i * (1 << 20), 192 << 10, pat),         # mid-device, 3 clusters
        (VSIZE - 8192 - (i % 2) * 4096, 6144, pat),           # the last clusters
    ]
    if i > 0:
        w.append(((300 << 20) + (i - 1) * (1 << 20) + 65536, 65536, 0))  # hide part of step i-1
        w.append((512 + (i - 1) * 4096 + 1024, 700, 0))                   # unaligned zeroes
    return w


def qemu_write(path: str, fmt: str, model: Model, i: int) -> None:
    cmds = []
    for off, n, pat in step_writes(i):
        cmds.append(f"write -z {off} {n}" if pat == 0 else f"write -P {pat} {off} {n}")
        model.add(off, n, pat)
    qemu.io(path, *cmds, fmt=fmt)


async def snapfs_write(vol, model: Model, i: int) -> None:
    for off, n, pat in step_writes(i):
        if pat == 0:
            await vol.write_zeroes(off, n)
        else:
            await vol.write(off, bytes([pat]) * n)
        model.add(off, n, pat)
    await vol.flush()


# --------------------------------------------------------------------------------------------
# Comparing contents: snapfs, qemu-img and the model, over the whole virtual size
# --------------------------------------------------------------------------------------------

def qemu_raw(path: str, out: Path, fmt: str | None = None) -> Path:
    """qemu-img convert -O raw of ``path`` through its backing chain (format as given)."""
    if out.exists():
        out.unlink()
    argv = ["convert", "-U", "-O", "raw"]
    if fmt:
        argv += ["-f", fmt]
    qemu.img(*argv, path, str(out))
    return out


def _data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) runs of a sparse file that are not holes (SEEK_DATA/SEEK_HOLE)."""
    runs, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        runs.append((start, min(end, size)))
        pos = end
    return runs


def _overlaps(runs, start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in runs)


class RawFile:
    """The raw file qemu-img wrote, read chunk by chunk; holes (most of a sparse volume) are
    not read, they are zeros."""

    def __init__(self, path: Path):
        self.path = path
        self.size = os.path.getsize(path)
        self.fd = os.open(path, os.O_RDONLY)
        self.runs = _data_runs(self.fd, self.size)

    def chunk(self, pos: int, n: int) -> bytes:
        if not _overlaps(self.runs, pos, pos + n):
            return ZERO[:n] if n != CHUNK else ZERO
        return os.pread(self.fd, n, pos)

    def close(self) -> None:
        os.close(self.fd)


def _first_difference(a: bytes, b: bytes) -> tuple[int, str, str]:
    k = next(k for k in range(len(a)) if a[k] != b[k])
    return k, a[k:k + 8].hex(), b[k:k + 8].hex()


async def assert_content(what: str, img, raw: Path, model: Model | None) -> None:
    """``img`` (a snapfs Volume or Image: ``.size``, ``await .read()``) reads exactly as the raw
    file qemu-img wrote, and that is what the model says was written, over the whole size."""
    size = img.size
    f = RawFile(raw)
    try:
        assert f.size == size, f"{what}: qemu-img says {f.size} bytes, snapfs {size}"
        if model is not None:
            assert model.size == size, f"{what}: model has {model.size} bytes, snapfs {size}"
        for pos in range(0, size, CHUNK):
            n = min(CHUNK, size - pos)
            ours, theirs = await img.read(pos, n), f.chunk(pos, n)
            if ours != theirs:
                k, a, b = _first_difference(ours, theirs)
                pytest.fail(f"{what}: snapfs and qemu-img differ at byte {pos + k}: "
                            f"snapfs {a}, qemu-img {b}")
            if model is not None:
                want = model.chunk(pos, n)
                if want != theirs:
                    k, a, b = _first_difference(want, theirs)
                    pytest.fail(f"{what}: qemu-img reads other than what was written at byte "
                                f"{pos + k}: expected {a}, got {b}")
    finally:
        f.close()


def assert_raw_matches_model(what: str, raw: Path, model: Model) -> None:
    f = RawFile(raw)
    try:
        assert f.size == model.size, f"{what}: {f.size} bytes, expected {model.size}"
        for pos in range(0, f.size, CHUNK):
            n = min(CHUNK, f.size - pos)
            got, want = f.chunk(pos, n), model.chunk(pos, n)
            if got != want:
                k, a, b = _first_difference(want, got)
                pytest.fail(f"{what}: differs from what was written at byte {pos + k}: "
                            f"expected {a}, got {b}")
    finally:
        f.close()


def header_backing(path: str) -> tuple[str | None, str | None]:
    """(backing file name, backing format) as recorded in a qcow2 header, per qemu-img."""
    info = qemu.info(path)
    return info.get("backing-filename"), info.get("backing-filename-format")


def assert_qemu_check_clean(share: Path, vid: str) -> None:
    for name in sorted(os.listdir(share)):
        if not name.startswith(f"volume-{vid}") or name.endswith(".info"):
            continue
        p = str(share / name)
        if qemu.info(p)["format"] != "qcow2":
            continue
        rc, out = qemu.check(p)
        assert rc == 0, f"qemu-img check {name}: exit {rc}: {out}"


def read_info(share: Path, vid: str) -> dict | None:
    p = share / f"volume-{vid}.info"
    if not p.exists():
        return None
    return json.loads(p.read_text())


# --------------------------------------------------------------------------------------------
# Upstream Cinder, offline
# --------------------------------------------------------------------------------------------

class NoNova:
    """Stand-in for Nova: every volume here is detached, so upstream must never call it."""

    def __getattr__(self, name):
        raise AssertionError(f"upstream Cinder called Nova ({name}) for a detached volume")


def _import_cinder():
    """Import upstream Cinder lazily; its absence FAILS the test (it is a test dependency)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eventlet's deprecation warning on import
            import cinder  # noqa: F401
            import cinder.privsep
            from cinder import compute, context, coordination, objects, utils
            from cinder.volume import configuration
            from cinder.volume.drivers import nfs, remotefs
            from oslo_config import cfg
        objects.register_all()
    except ImportError as exc:
        pytest.fail(f"upstream OpenStack Cinder is not installed ({exc}); the interop tests "
                    f"need it: pip install '{REQUIREMENT}' (it is in the project's test extra)",
                    pytrace=False)
    return {"cinder": cinder, "compute": compute, "context": context,
            "coordination": coordination, "objects": objects, "utils": utils,
            "configuration": configuration, "nfs": nfs, "remotefs": remotefs, "cfg": cfg}


class Upstream:
    """Upstream's NfsDriver on ``share`` plus real cinder objects for its volumes/snapshots."""

    def __init__(self, m: dict, share: Path, workdir: Path):
        self.m = m
        self.share = share
        self.workdir = workdir
        self.ctx = m["context"].get_admin_context()
        self.saved: list[str] = []

    def driver(self, *, qcow2: bool):
        m = self.m
        c = m["configuration"].Configuration(None)
        c.append_config_values(m["nfs"].nfs_opts)
        c.append_config_values(m["remotefs"].nas_opts)
        # What an admin puts in cinder.conf for an NFS backend with snapshots.
        c.nas_host, c.nas_share_path = SHARE.split(":", 1)
        c.nfs_shares_config = None
        c.nfs_mount_point_base = str(self.workdir / "mnt")
        c.nfs_qcow2_volumes = qcow2
        c.nfs_sparsed_volumes = True
        c.nfs_snapshot_support = True
        c.nas_secure_file_operations = "false"   # required for nfs_snapshot_support
        c.nas_secure_file_permissions = "false"
        drv = m["nfs"].NfsDriver(configuration=c)
        share = str(self.share)
        real_execute = drv._execute

        def execute(*cmd, **kwargs):
            if cmd and cmd[0] == "mount.nfs":      # do_setup's "is the NFS client installed"
                return "", ""
            return real_execute(*cmd, **kwargs)

        drv._execute = execute
        drv._ensure_share_mounted = lambda nfs_share: None
        drv._get_mount_point_for_share = lambda nfs_share: share
        drv.do_setup(self.ctx)
        assert drv._mounted_shares == [SHARE]
        assert drv.format == ("qcow2" if qcow2 else "raw")
        return drv

    def new_volume(self, vid: str):
        return self.m["objects"].Volume(
            context=self.ctx, id=vid, _name_id=None, size=VSIZE // GiB, status="available",
            attach_status="detached", admin_metadata={}, encryption_key_id=None,
            provider_location=None, display_name=f"interop-{vid[:8]}", volume_type_id=None)

    def existing_volume(self, vid: str, *, base_format: str, has_snapshots: bool):
        """A volume created elsewhere (by snapfs), as Cinder's database would describe it."""
        vol = self.new_volume(vid)
        vol.provider_location = SHARE
        meta = {"format": "qcow2" if has_snapshots else base_format}
        if has_snapshots:
            meta["base_format"] = base_format
        vol.admin_metadata = meta
        return vol

    def snapshot(self, vol, sid: str):
        return self.m["objects"].Snapshot(
            context=self.ctx, id=sid, volume_id=vol.id, volume=vol, status="available",
            display_name=f"interop-{sid[:8]}", encryption_key_id=None, volume_size=vol.size)

    def active_path(self, drv, vol) -> str:
        return str(self.share / drv.get_active_image_from_info(vol))


@contextlib.contextmanager
def upstream_cinder(share: Path, workdir: Path):
    m = _import_cinder()
    cfg = m["cfg"].CONF
    pctxt = m["cinder"].privsep.sys_admin_pctxt
    coordinator = m["coordination"].COORDINATOR
    up = Upstream(m, share, workdir)
    with contextlib.ExitStack() as stack:
        # Database: nothing to save to; remember what upstream saved.
        for cls in (m["objects"].Volume, m["objects"].Snapshot):
            stack.enter_context(mock.patch.object(
                cls, "save", autospec=True,
                side_effect=lambda obj, _n=cls.__name__: up.saved.append(f"{_n} {obj.id}")))
        # Nova: must not be used (volumes are detached).
        stack.enter_context(mock.patch.object(m["compute"], "API", NoNova))
        # Privileges: run upstream's commands directly (root: processutils adds no helper).
        if os.geteuid() != 0:
            stack.enter_context(mock.patch.object(m["utils"], "get_root_helper",
                                                  return_value="env"))
        pctxt.set_client_mode(False)
        stack.callback(pctxt.set_client_mode, True)
        # Coordination: tooz's file driver under the test's tmp directory.
        cfg.set_override("backend_url", f"file://{workdir / 'cinder-locks'}", group="coordination")
        stack.callback(cfg.clear_override, "backend_url", group="coordination")
        coordinator.start()
        stack.callback(coordinator.stop)
        yield up


# --------------------------------------------------------------------------------------------
# snapfs
# --------------------------------------------------------------------------------------------

async def settle(svc) -> None:
    """Wait for background merges; none may have failed."""
    await svc.wait_idle()
    assert not svc.failed, f"snapfs marked volumes failed: {svc.failed}"


def new_service(share: Path, default_format: str = "raw"):
    from snapfs.chain.service import VolumeService
    return VolumeService(str(share), default_format=default_format)


async def check_snapfs_volume(svc, share: Path, tmp: Path, vid: str, *, base_format: str,
                              model: Model | None, snap_models: dict[str, Model | None]) -> dict:
    """snapfs serves volume ``vid`` as qemu-img sees it; its snapshots are upstream's."""
    up_info = read_info(share, vid)
    active = up_info["active"] if up_info else f"volume-{vid}"
    upstream_snaps = sorted(k for k in (up_info or {}) if k != "active")
    assert upstream_snaps == sorted(snap_models), (upstream_snaps, sorted(snap_models))

    info = await svc.handle({"op": "info", "volume": vid})
    assert info["state"] == "ok", info
    assert info["volume"] == vid
    assert info["size"] == VSIZE
    assert info["base_format"] == base_format, info
    assert info["active"] == active, info
    assert sorted(s["id"] for s in info["snapshots"]) == upstream_snaps, info
    for s in info["snapshots"]:
        assert s["size"] == VSIZE, s
        assert isinstance(s["created"], (int, float)), s
    names = [f["name"] for f in info["files"]]
    assert names[0] == f"volume-{vid}" and names[-1] == active, names
    expected = {f"volume-{vid}", active} | {up_info[s] for s in upstream_snaps}
    assert set(names) == expected, (f"volume {vid}: chain files {names}, but the .info "
                                    f"accounts for {sorted(expected)}")

    active_fmt = "qcow2" if active != f"volume-{vid}" else base_format
    vol = await svc.volume(vid)
    try:
        raw = qemu_raw(str(share / active), tmp / "active.raw", active_fmt)
        await assert_content(f"volume {vid}", vol, raw, model)
        for sid in upstream_snaps:
            overlay = up_info[sid]
            backing, bfmt = header_backing(str(share / overlay))
            raw = qemu_raw(str(share / backing), tmp / "snap.raw", bfmt)
            await assert_content(f"snapshot {sid} of volume {vid}", vol.below(overlay), raw,
                                 snap_models[sid])
    finally:
        await svc.release(vid)
    return info


def assert_upstream_accepts(up: Upstream, drv, vol, *, snapshots: list[str]) -> None:
    """Upstream reads the share as its own: .info, active image, qemu-img info with its
    backing-file name check on every file of the chain."""
    share = up.share
    info_path = drv._local_path_volume_info(vol)
    snap_info = drv._read_info_file(info_path, empty_if_missing=True)
    assert sorted(k for k in snap_info if k != "active") == sorted(snapshots), snap_info
    assert drv._get_volume_snapshots(vol) == [k for k in snap_info if k != "active"]
    active = drv.get_active_image_from_info(vol)
    assert os.path.exists(share / active)
    # Walks the chain from the active file with upstream's _qemu_img_info on every file: its
    # format inspector and backing-file name check refuse anything unexpected.
    chain = drv._get_backing_chain_for_path(vol, str(share / active))
    files = [c["filename"] for c in chain]
    assert files[-1] == vol.name, chain
    for name in files:
        assert qemu.info(str(share / name))["virtual-size"] == VSIZE, name
    for sid in snapshots:
        assert snap_info[sid] in files[:-1], (sid, snap_info[sid], files)


# --------------------------------------------------------------------------------------------
# 1. Shares written by upstream Cinder, served by snapfs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
async def test_upstream_share_served_by_snapfs(tmp_path, share, base_format):
    _import_cinder()
    qcow2 = base_format == "qcow2"
    vid_a, vid_b, vid_c = (str(uuid.uuid4()) for _ in range(3))
    sids = [str(uuid.uuid4()) for _ in range(5)]
    model_a, model_b, model_c = Model(), Model(), Model()
    snap_models: dict[str, Model] = {}

    with upstream_cinder(share, tmp_path) as up:
        drv = up.driver(qcow2=qcow2)

        # Volume A: five snapshots with writes between them, then upstream deletes the
        # oldest (s0), a middle one (s2) and the latest (s4, whose overlay is the active file).
        vol_a = up.new_volume(vid_a)
        assert drv.create_volume(vol_a) == {"provider_location": SHARE}
        assert up.saved == [f"Volume {vid_a}"]   # (the "database" got the admin metadata)
        vol_a.provider_location = SHARE
        assert vol_a.admin_metadata["format"] == base_format
        assert qemu.info(str(share / vol_a.name))["format"] == base_format
        qemu_write(up.active_path(drv, vol_a), base_format, model_a, 0)
        for i, sid in enumerate(sids):
            drv.create_snapshot(up.snapshot(vol_a, sid))
            snap_models[sid] = model_a.copy()
            qemu_write(up.active_path(drv, vol_a), "qcow2", model_a, i + 1)
        assert read_info(share, vid_a)["active"] == f"{vol_a.name}.{sids[-1]}"
        assert vol_a.admin_metadata == {"format": "qcow2", "base_format": base_format}
        for sid in (sids[0], sids[2], sids[4]):
            drv.delete_snapshot(up.snapshot(vol_a, sid))
            del snap_models[sid]
        info_a = read_info(share, vid_a)
        assert info_a == {"active": f"{vol_a.name}.{sids[3]}",
                          sids[1]: f"{vol_a.name}.{sids[1]}",
                          sids[3]: f"{vol_a.name}.{sids[3]}"}
        assert header_backing(str(share / info_a[sids[1]])) == (vol_a.name, base_format)
        assert header_backing(str(share / info_a[sids[3]])) == (info_a[sids[1]], "qcow2")
        assert_upstream_accepts(up, drv, vol_a, snapshots=[sids[1], sids[3]])

        # Volume B: had one snapshot, upstream deleted it (the .info stays, active = base).
        vol_b = up.new_volume(vid_b)
        drv.create_volume(vol_b)
        vol_b.provider_location = SHARE
        qemu_write(up.active_path(drv, vol_b), base_format, model_b, 0)
        sid_b = str(uuid.uuid4())
        drv.create_snapshot(up.snapshot(vol_b, sid_b))
        qemu_write(up.active_path(drv, vol_b), "qcow2", model_b, 1)
        drv.delete_snapshot(up.snapshot(vol_b, sid_b))
        assert read_info(share, vid_b) == {"active": vol_b.name}
        assert vol_b.admin_metadata["format"] == base_format

        # Volume C: never had a snapshot (no .info).
        vol_c = up.new_volume(vid_c)
        drv.create_volume(vol_c)
        vol_c.provider_location = SHARE
        qemu_write(up.active_path(drv, vol_c), base_format, model_c, 0)
        assert read_info(share, vid_c) is None

    # The oracle agrees with what was written (sanity of the test and of upstream).
    assert_raw_matches_model("upstream volume A", qemu_raw(
        str(share / info_a["active"]), tmp_path / "a.raw"), model_a)

    svc = new_service(share, base_format)
    async with svc.running():
        listed = await svc.handle({"op": "list"})
        assert sorted(listed["volumes"]) == sorted([vid_a, vid_b, vid_c])
        assert (await svc.handle({"op": "list", "unmanaged": True}))["unmanaged"] == []
        await check_snapfs_volume(svc, share, tmp_path, vid_a, base_format=base_format,
                                  model=model_a, snap_models=snap_models)
        await check_snapfs_volume(svc, share, tmp_path, vid_b, base_format=base_format,
                                  model=model_b, snap_models={})
        await check_snapfs_volume(svc, share, tmp_path, vid_c, base_format=base_format,
                                  model=model_c, snap_models={})

        # snapfs takes and deletes snapshots on the upstream-written share.
        t0, t1 = str(uuid.uuid4()), str(uuid.uuid4())
        await svc.handle({"op": "create-snapshot", "volume": vid_a, "snapshot": t0})
        snap_models[t0] = model_a.copy()
        vol = await svc.volume(vid_a)
        await snapfs_write(vol, model_a, 10)
        await svc.release(vid_a)
        await svc.handle({"op": "create-snapshot", "volume": vid_a, "snapshot": t1})
        snap_models[t1] = model_a.copy()
        vol = await svc.volume(vid_a)
        await snapfs_write(vol, model_a, 11)
        await svc.release(vid_a)
        # Delete upstream's oldest remaining snapshot, and snapfs's latest (the active one).
        await svc.handle({"op": "delete-snapshot", "volume": vid_a, "snapshot": sids[1]})
        del snap_models[sids[1]]
        await settle(svc)
        await svc.handle({"op": "delete-snapshot", "volume": vid_a, "snapshot": t1})
        del snap_models[t1]
        await settle(svc)
        # snapfs writes into C's base (raw, or qcow2 with upstream's preallocated metadata),
        # then B and C get a snapshot too (B's .info has only "active"; C has no .info).
        vol = await svc.volume(vid_c)
        await snapfs_write(vol, model_c, 14)
        await svc.release(vid_c)
        t_b, t_c = str(uuid.uuid4()), str(uuid.uuid4())
        await svc.handle({"op": "create-snapshot", "volume": vid_b, "snapshot": t_b})
        await svc.handle({"op": "create-snapshot", "volume": vid_c, "snapshot": t_c})
        snap_b, snap_c = model_b.copy(), model_c.copy()
        for vid, model, step in ((vid_b, model_b, 12), (vid_c, model_c, 13)):
            vol = await svc.volume(vid)
            await snapfs_write(vol, model, step)
            await svc.release(vid)

        # base <- .s3 <- .t0 (active): .s1 merged into the base, .t1 into .t0.
        assert read_info(share, vid_a) == {"active": f"volume-{vid_a}.{t0}",
                                           sids[3]: f"volume-{vid_a}.{sids[3]}",
                                           t0: f"volume-{vid_a}.{t0}"}
        await check_snapfs_volume(svc, share, tmp_path, vid_a, base_format=base_format,
                                  model=model_a, snap_models=snap_models)
        await check_snapfs_volume(svc, share, tmp_path, vid_b, base_format=base_format,
                                  model=model_b, snap_models={t_b: snap_b})
        await check_snapfs_volume(svc, share, tmp_path, vid_c, base_format=base_format,
                                  model=model_c, snap_models={t_c: snap_c})

    for vid in (vid_a, vid_b, vid_c):
        assert_qemu_check_clean(share, vid)

    # ... and the share is still upstream's: it reads it and deletes the remaining snapshots.
    with upstream_cinder(share, tmp_path) as up:
        drv = up.driver(qcow2=qcow2)
        vol_a = up.existing_volume(vid_a, base_format=base_format, has_snapshots=True)
        assert_upstream_accepts(up, drv, vol_a, snapshots=[sids[3], t0])
        drv.delete_snapshot(up.snapshot(vol_a, sids[3]))
        drv.delete_snapshot(up.snapshot(vol_a, t0))
        assert read_info(share, vid_a) == {"active": f"volume-{vid_a}"}
        assert vol_a.admin_metadata["format"] == base_format
        for vid, sid in ((vid_b, t_b), (vid_c, t_c)):
            v = up.existing_volume(vid, base_format=base_format, has_snapshots=True)
            assert_upstream_accepts(up, drv, v, snapshots=[sid])
    assert_raw_matches_model("volume A after upstream merged everything", qemu_raw(
        str(share / f"volume-{vid_a}"), tmp_path / "a.raw", base_format), model_a)
    assert_qemu_check_clean(share, vid_a)


# --------------------------------------------------------------------------------------------
# 2. Shares written by snapfs, used by upstream Cinder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
async def test_snapfs_share_used_by_upstream(tmp_path, share, base_format):
    _import_cinder()
    vid = str(uuid.uuid4())
    sids = [str(uuid.uuid4()) for _ in range(3)]
    model = Model()
    snap_models: dict[str, Model] = {}

    svc = new_service(share, base_format)
    async with svc.running():
        await svc.handle({"op": "create-volume", "volume": vid, "size": VSIZE,
                          "format": base_format})
        vol = await svc.volume(vid)
        await snapfs_write(vol, model, 0)
        await svc.release(vid)
        for i, sid in enumerate(sids):
            await svc.handle({"op": "create-snapshot", "volume": vid, "snapshot": sid})
            snap_models[sid] = model.copy()
            vol = await svc.volume(vid)
            await snapfs_write(vol, model, i + 1)
            await svc.release(vid)
    info = read_info(share, vid)
    assert info == {"active": f"volume-{vid}.{sids[-1]}",
                    **{s: f"volume-{vid}.{s}" for s in sids}}
    assert qemu.info(str(share / f"volume-{vid}"))["format"] == base_format
    assert_qemu_check_clean(share, vid)
    # Backing files: bare relative names with their format (as qemu-img rebase -u writes).
    below = [f"volume-{vid}"] + [f"volume-{vid}.{s}" for s in sids]
    for k, s in enumerate(sids):
        assert header_backing(str(share / f"volume-{vid}.{s}")) == (
            below[k], base_format if k == 0 else "qcow2")

    def check_qemu_view(snapshots: list[str]) -> None:
        active = read_info(share, vid)["active"]
        fmt = "qcow2" if active != f"volume-{vid}" else base_format
        assert_raw_matches_model(f"volume {vid} ({active})", qemu_raw(
            str(share / active), tmp_path / "active.raw", fmt), model)
        for s in snapshots:
            backing, bfmt = header_backing(str(share / f"volume-{vid}.{s}"))
            assert_raw_matches_model(f"snapshot {s}", qemu_raw(
                str(share / backing), tmp_path / "snap.raw", bfmt), snap_models[s])
        assert_qemu_check_clean(share, vid)

    check_qemu_view(sids)

    with upstream_cinder(share, tmp_path) as up:
        drv = up.driver(qcow2=base_format == "qcow2")
        vol = up.existing_volume(vid, base_format=base_format, has_snapshots=True)
        assert_upstream_accepts(up, drv, vol, snapshots=sids)
        assert drv._snapshots_exist(vol)
        # snapfs's side files (.snapfs/) do not disturb upstream's share accounting.
        stats = drv.get_volume_stats(refresh=True)
        assert stats["total_capacity_gb"] > 0 and stats["provisioned_capacity_gb"] >= 0, stats
        # Middle snapshot (commit into the one below, rebase the one above).
        drv.delete_snapshot(up.snapshot(vol, sids[1]))
        del snap_models[sids[1]]
        check_qemu_view([sids[0], sids[2]])
        # Latest snapshot (its overlay is the active file: committed down, active moves).
        drv.delete_snapshot(up.snapshot(vol, sids[2]))
        del snap_models[sids[2]]
        assert read_info(share, vid)["active"] == f"volume-{vid}.{sids[0]}"
        check_qemu_view([sids[0]])

    # snapfs serves what upstream left, writes and snapshots again.
    svc = new_service(share, base_format)
    async with svc.running():
        await check_snapfs_volume(svc, share, tmp_path, vid, base_format=base_format,
                                  model=model, snap_models=dict(snap_models))
        s_new = str(uuid.uuid4())
        await svc.handle({"op": "create-snapshot", "volume": vid, "snapshot": s_new})
        snap_models[s_new] = model.copy()
        vol = await svc.volume(vid)
        await snapfs_write(vol, model, 7)
        await svc.release(vid)
        await check_snapfs_volume(svc, share, tmp_path, vid, base_format=base_format,
                                  model=model, snap_models=dict(snap_models))
    check_qemu_view(list(snap_models))

    # Upstream deletes the rest: the older one (rebase path), then the last one (active path,
    # back to the base file; its format comes back from the admin metadata).
    with upstream_cinder(share, tmp_path) as up:
        drv = up.driver(qcow2=base_format == "qcow2")
        vol = up.existing_volume(vid, base_format=base_format, has_snapshots=True)
        assert_upstream_accepts(up, drv, vol, snapshots=[sids[0], s_new])
        drv.delete_snapshot(up.snapshot(vol, sids[0]))
        del snap_models[sids[0]]
        check_qemu_view([s_new])
        drv.delete_snapshot(up.snapshot(vol, s_new))
        del snap_models[s_new]
        assert read_info(share, vid) == {"active": f"volume-{vid}"}
        assert vol.admin_metadata["format"] == base_format
        assert not drv._snapshots_exist(vol)
        check_qemu_view([])
        assert_upstream_accepts(up, drv, vol, snapshots=[])

    svc = new_service(share, base_format)
    async with svc.running():
        await check_snapfs_volume(svc, share, tmp_path, vid, base_format=base_format,
                                  model=model, snap_models={})
