"""Connections through the real os-brick connector, Cinder's own attach paths (image copy,
backup, restore) and image transfers through the raw files in the mount."""

import json
import mmap
import os
import subprocess
import sys
import time

import pytest
from os_brick.initiator import connector as brick_connector
from os_brick.initiator.connectors import gpfs as brick_gpfs

from cinder import exception
from cinder import utils as cinder_utils
from cinder.volume import volume_utils
from tests.cinder.conftest import (FakeImageService, GiB, MiB, mount_point, pattern, read_at,
                                   same_content, write_at)


def expected_file(tmp, name, size, chunks) -> str:
    """A sparse raw file with ``chunks`` ({offset: bytes}): the oracle for a volume."""
    path = os.path.join(str(tmp), name)
    with open(path, 'wb') as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


_PROPERTIES = []


@pytest.fixture
def connector_properties(cinder_env):
    """What cinder-volume sends as the connector for its own attaches (the real os-brick
    call, once: it probes every transport)."""
    if not _PROPERTIES:
        _PROPERTIES.append(volume_utils.brick_get_connector_properties())
    return _PROPERTIES[0]


def test_initialize_connection_through_os_brick(backend, connector_properties):
    be, drv = backend, backend.driver
    vol = be.create_volume(1)
    data = pattern(10, 4 * MiB)
    write_at(be.path(vol), 3 * MiB, data)

    conn = drv.initialize_connection(vol, connector_properties)
    assert conn['driver_volume_type'] == 'gpfs'  # never 'nfs' (see the module docstring)
    assert conn['data']['device_path'] == be.path(vol)
    assert conn['data']['format'] == 'raw'

    brick = brick_connector.InitiatorConnector.factory(
        conn['driver_volume_type'], cinder_utils.get_root_helper())
    assert isinstance(brick, brick_gpfs.GPFSConnector)
    device = brick.connect_volume(conn['data'])
    assert same_content(device['path'], expected_file(be.tmp, 'want', GiB, {3 * MiB: data}))
    assert os.path.getsize(device['path']) == GiB

    # As QEMU opens it with cache=none (what Nova's gpfs volume driver asks for): O_DIRECT.
    fd = os.open(device['path'], os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        assert os.preadv(fd, [buf], 3 * MiB) == 4096
        assert bytes(buf) == data[:4096]
    finally:
        os.close(fd)
    brick.disconnect_volume(conn['data'], device)
    drv.terminate_connection(vol, connector_properties)
    drv.delete_volume(vol)


def test_cinder_attach_paths_for_backup_and_restore(backend, connector_properties):
    """driver._attach_volume (image copy, migration) and, as the backup manager does,
    initialize_connection(_snapshot) plus _connect_device, then open() on the path."""
    be, drv = backend, backend.driver
    vol = be.create_volume(1)
    before = pattern(11, 2 * MiB)
    write_at(be.path(vol), 0, before)

    attach_info, vol = drv._attach_volume(be.ctx, vol, connector_properties)
    path = attach_info['device']['path']
    assert attach_info['device']['type'] == 'gpfs' and path == be.path(vol)
    assert read_at(path, 0, 2 * MiB) == before
    drv._detach_volume(be.ctx, attach_info, vol, connector_properties, force=True)

    # Backup from a temporary snapshot: the snapshot's read-only raw file.
    snap = be.create_snapshot(vol)
    write_at(be.path(vol), 0, pattern(12, MiB))
    conn = drv.initialize_connection_snapshot(snap, connector_properties)
    assert conn['data']['access_mode'] == 'ro'
    snap_info = drv._connect_device(conn)
    with open(snap_info['device']['path'], 'rb') as f:  # backup manager: open(path, 'rb')
        assert f.read(2 * MiB) == before
    with pytest.raises(OSError):
        open(snap_info['device']['path'], 'r+b').close()
    snap_info['connector'].disconnect_volume(conn['data'], snap_info['device'])
    drv.terminate_connection_snapshot(snap, connector_properties)

    # Restore: the backup manager opens the device with 'wb' and writes the whole volume.
    restored = pattern(13, 3 * MiB)
    attach_info, vol = drv._attach_volume(be.ctx, vol, connector_properties)
    with open(attach_info['device']['path'], 'wb') as f:  # O_TRUNC: ignored, size kept
        f.write(restored)
    drv._detach_volume(be.ctx, attach_info, vol, connector_properties, force=True)
    assert os.path.getsize(be.path(vol)) == GiB
    assert read_at(be.path(vol), 0, 3 * MiB) == restored
    drv.delete_snapshot(snap)
    drv.delete_volume(vol)
    assert be.share_files() == ['.snapfs']


def test_copy_image_to_volume(backend):
    be, drv = backend, backend.driver
    svc = FakeImageService(be.tmp)

    raw = expected_file(be.tmp, 'image.raw', 6 * MiB, {0: pattern(20, MiB),
                                                      4 * MiB: pattern(21, MiB)})
    vol = be.create_volume(1)
    write_at(be.path(vol), 2 * MiB, pattern(22, MiB))  # zeros in the image must win
    drv.copy_image_to_volume(be.ctx, vol, svc, svc.add(raw, 'raw'))
    assert os.path.getsize(be.path(vol)) == GiB
    assert same_content(be.path(vol), raw)

    src = expected_file(be.tmp, 'qsrc.raw', 96 * MiB, {MiB: pattern(23, 2 * MiB),
                                                      80 * MiB: pattern(24, MiB)})
    qcow = os.path.join(str(be.tmp), 'image.qcow2')
    subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', src, qcow], check=True)
    qvol = be.create_volume(1)
    drv.copy_image_to_volume(be.ctx, qvol, svc, svc.add(qcow, 'qcow2'))
    assert os.path.getsize(be.path(qvol)) == GiB
    assert same_content(be.path(qvol), src)

    big = os.path.join(str(be.tmp), 'big.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', big, '2G'], check=True)
    with pytest.raises(exception.ImageUnacceptable):
        drv.copy_image_to_volume(be.ctx, qvol, svc, svc.add(big, 'qcow2'))
    assert same_content(be.path(qvol), src)  # untouched

    with pytest.raises(exception.ImageUnacceptable):  # Glance says raw, the data is qcow2
        drv.copy_image_to_volume(be.ctx, qvol, svc, svc.add(qcow, 'raw'))
    for v in (vol, qvol):
        drv.delete_volume(v)
    assert be.share_files() == ['.snapfs']


def test_copy_volume_to_image(backend):
    be, drv = backend, backend.driver
    svc = FakeImageService(be.tmp)
    vol = be.create_volume(1)
    chunks = {MiB: pattern(30, 2 * MiB), 700 * MiB: pattern(31, MiB)}
    for offset, data in chunks.items():
        write_at(be.path(vol), offset, data)
    want = expected_file(be.tmp, 'want.raw', GiB, chunks)

    meta = svc.new_image('raw')
    drv.copy_volume_to_image(be.ctx, vol, svc, meta)
    uploaded = svc.uploads[meta['id']]
    assert os.path.getsize(uploaded) == GiB
    assert same_content(uploaded, want)

    meta = svc.new_image('qcow2')
    drv.copy_volume_to_image(be.ctx, vol, svc, meta)
    uploaded = svc.uploads[meta['id']]
    info = subprocess.run(['qemu-img', 'info', '--output=json', uploaded],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info and '"virtual-size": %d' % GiB in info
    assert same_content(uploaded, want, 'qcow2', 'raw')
    drv.delete_volume(vol)


def test_a_compute_host_attaches_while_the_cinder_host_snapshots(backend, tmp_path):
    """The attach path of many hosts: the compute host mounts the share with `snapfs
    attach-mounts` at the driver's layout, its guest writes the connection's file, and the
    Cinder host's snapshots and clones (carried out by the compute host, the owner) hold
    exactly what the guest had written."""
    be, drv = backend, backend.driver
    vol = be.create_volume(1)
    conn = drv.initialize_connection(vol, {'host': 'compute1'})
    rel = os.path.relpath(conn['data']['device_path'], str(be.base))
    compute_base = tmp_path / 'compute'
    argv = [sys.executable, '-m', 'snapfs.cli', 'attach-mounts', '--base', str(compute_base),
            '--host-id', 'compute1', '-o', f'allow_other,log={tmp_path}/compute.log',
            str(be.share)]
    compute_mnt = mount_point(compute_base, be.share)
    try:
        for _ in range(2):  # idempotent: the second run finds the mount
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [str(be.share), compute_mnt]
        device = os.path.join(str(compute_base), rel)  # what Nova opens on the compute host
        first = pattern(1, 4 * MiB)
        write_at(device, 0, first)
        with open(device, 'r+b') as f:
            os.fsync(f.fileno())
        with open(os.path.join(compute_mnt, '.snapfs', 'status')) as f:
            assert vol.name_id in json.load(f)['owned']
        snap = be.create_snapshot(vol)  # on the Cinder host, carried out by compute1
        write_at(device, 0, pattern(2, 4 * MiB))
        assert read_at(be.snapshot_path(snap), 0, 4 * MiB) == first
        clone = be.volume(1)
        clone.update(drv.create_volume_from_snapshot(clone, snap) or {})
        assert read_at(be.path(clone), 0, 4 * MiB) == first
        assert read_at(device, 0, 4 * MiB) == pattern(2, 4 * MiB)
        drv.delete_snapshot(snap)  # merged by compute1 while it has the volume open
        assert read_at(be.path(vol), 0, 4 * MiB) == pattern(2, 4 * MiB)
    finally:
        subprocess.run(['fusermount3', '-u', compute_mnt], capture_output=True)
        for _ in range(100):
            if fstype_of(compute_mnt) is None:
                break
            time.sleep(0.05)


def fstype_of(path):
    from snapfs.attach import fstype
    return fstype(path)
