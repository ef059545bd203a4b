"""SnapfsDriver: compliance, loading, the volume/snapshot lifecycle, error mapping, stats and
manage, against a live snapfs mount (tests/cinder/conftest.py)."""

import ast
import os
import subprocess

import pytest
from oslo_utils import importutils

from cinder import exception
from cinder.interface import util as interface_util
from cinder.interface import volume_driver
from cinder.interface import volume_manageable_driver
from cinder.interface import volume_snapshot_revert
from tests.cinder.conftest import (DRIVER, GiB, MiB, REPO, pattern, read_at, same_content,
                                   write_at)

# -- the driver as Cinder sees it -----------------------------------------------------------


def test_compliance_as_cinders_check():
    """cinder/tests/compliance/test_volume_drivers.py, minus its import of cinder.tests.unit
    (which monkey-patches the process): every registered driver subclasses VolumeDriverCore."""
    cls = importutils.import_class(DRIVER)
    drivers = {d.class_fqn: d for d in interface_util.get_volume_drivers()}
    assert DRIVER in drivers
    info = drivers[DRIVER]
    assert issubclass(info.cls, volume_driver.VolumeDriverCore)
    assert info.cls is cls and info.version and info.ci_wiki_name
    assert {o.name for o in info.driver_options} >= {
        'snapfs_shares_config', 'snapfs_mount_point_base', 'snapfs_mount_options',
        'snapfs_qcow2_volumes', 'snapfs_secure_file_operations', 'snapfs_ctl_group',
        'snapfs_mount_helper', 'snapfs_control_timeout'}
    for iface in (volume_snapshot_revert.VolumeSnapshotRevertDriver,
                  volume_manageable_driver.VolumeListManageableDriver):
        assert issubclass(cls, iface)


def test_driver_imports_only_snapfs_ctl():
    """The layering rule: cinder_driver uses snapfs through the control protocol and the
    mount layout every host shares (snapfs.attach) only, never the engine."""
    pkg = os.path.join(REPO, 'cinder_driver')
    for name in os.listdir(pkg):
        if not name.endswith('.py'):
            continue
        with open(os.path.join(pkg, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module + '.' + a.name for a in node.names]
            for mod in mods:
                if mod.startswith('snapfs'):
                    assert mod in ('snapfs.ctl', 'snapfs.attach'), f'{name} imports {mod}'


def test_loaded_by_volume_driver_path(backend):
    """The fixture built the driver as cinder-volume does (importutils.import_object with the
    backend's Configuration), then do_setup and check_for_setup_error."""
    drv = backend.driver
    assert type(drv).__module__ + '.' + type(drv).__name__ == DRIVER
    assert drv.initialized is False  # the manager sets it after check_for_setup_error
    assert drv.configuration.snapfs_mount_point_base == str(backend.base)
    assert os.path.ismount(backend.mnt)


# -- the lifecycle --------------------------------------------------------------------------


def test_full_lifecycle(backend):
    be, drv = backend, backend.driver
    vol = be.create_volume(1)
    path = be.path(vol)
    assert vol.provider_location == str(be.share)
    assert os.path.getsize(path) == 1 * GiB
    assert 'volume-' + vol.id in be.share_files()

    a, b, c = pattern(1, 2 * MiB), pattern(2, 2 * MiB), pattern(3, 1 * MiB)
    write_at(path, 0, a)
    s1 = be.create_snapshot(vol)
    write_at(path, MiB, b)
    s2 = be.create_snapshot(vol)
    write_at(path, 0, c)
    assert sorted(os.listdir(os.path.dirname(be.snapshot_path(s1)))) == sorted([s1.id, s2.id])
    assert read_at(be.snapshot_path(s1), 0, 2 * MiB) == a
    assert read_at(be.snapshot_path(s2), 0, 3 * MiB) == a[:MiB] + b
    assert read_at(path, 0, 3 * MiB) == c + b

    # A clone of the first snapshot, larger: the snapshot's content, zeros beyond.
    clone = be.volume(2)
    clone.update(drv.create_volume_from_snapshot(clone, s1))
    assert clone.provider_location == vol.provider_location
    assert os.path.getsize(be.path(clone)) == 2 * GiB
    assert read_at(be.path(clone), 0, 2 * MiB) == a
    assert read_at(be.path(clone), GiB, MiB) == bytes(MiB)
    write_at(be.path(clone), 0, b)  # independent of its source
    assert read_at(be.snapshot_path(s1), 0, 2 * MiB) == a

    # Revert to the OLDER snapshot (upstream can only revert to the latest).
    drv.revert_to_snapshot(be.ctx, vol, s1)
    assert read_at(path, 0, 3 * MiB) == a + bytes(MiB)
    assert read_at(be.snapshot_path(s2), 0, 3 * MiB) == a[:MiB] + b

    drv.extend_volume(vol, 3)
    vol.size = 3
    assert os.path.getsize(path) == 3 * GiB
    assert read_at(path, 0, 2 * MiB) == a

    for snap in (s2, s1):
        drv.delete_snapshot(snap)
    assert os.listdir(os.path.dirname(be.snapshot_path(s1))) == []
    assert read_at(path, 0, 2 * MiB) == a
    drv.delete_volume(clone)
    drv.delete_volume(vol)
    assert not os.path.exists(path)
    assert be.share_files() == ['.snapfs']


def test_clone_of_attached_volume_at_larger_size(backend):
    be, drv = backend, backend.driver
    src = be.create_volume(1)
    data = pattern(4, 3 * MiB)
    fd = os.open(be.path(src), os.O_RDWR)  # held open, as by a guest
    try:
        os.pwrite(fd, data, 5 * MiB)
        os.fsync(fd)
        clone = be.volume(2)
        clone.update(drv.create_cloned_volume(clone, src))
        os.pwrite(fd, pattern(5, MiB), 5 * MiB)  # later writes stay out of the clone
    finally:
        os.close(fd)
    assert os.path.getsize(be.path(clone)) == 2 * GiB
    assert read_at(be.path(clone), 5 * MiB, 3 * MiB) == data
    assert read_at(be.path(clone), 0, MiB) == bytes(MiB)
    snap = be.create_snapshot(src)  # also of the attached-then-closed volume
    drv.delete_snapshot(snap)
    for vol in (clone, src):
        drv.delete_volume(vol)
    assert be.share_files() == ['.snapfs']


def test_qcow2_volumes_switch(tmp_path, cinder_env):
    from tests.cinder.conftest import Backend
    be = Backend(tmp_path, cinder_env, group='snapfs-qcow2', snapfs_qcow2_volumes=True)
    try:
        be.premount()
        be.load_driver()
        vol = be.create_volume(1)
        write_at(be.path(vol), 0, pattern(6, MiB))
        base = os.path.join(be.share, 'volume-' + vol.id)
        r = subprocess.run(['qemu-img', 'info', '-U', '--output=json', base],
                           capture_output=True, text=True, check=True)
        assert '"format": "qcow2"' in r.stdout
        assert read_at(be.path(vol), 0, MiB) == pattern(6, MiB)  # still raw in the mount
        be.driver.delete_volume(vol)
    finally:
        be.close()


# -- errors ---------------------------------------------------------------------------------


def test_error_mapping(backend):
    be, drv = backend, backend.driver
    vol = be.create_volume(1)
    snap = be.create_snapshot(vol)

    with pytest.raises(exception.VolumeIsBusy):
        drv.delete_volume(vol)
    assert os.path.exists(be.path(vol))

    # Cinder expects deleting what is already gone to succeed.
    ghost = be.volume(1, provider_location=str(be.share))
    drv.delete_volume(ghost)
    drv.delete_volume(be.volume(1))  # never got a share
    drv.delete_snapshot(be.snapshot(vol))
    drv.delete_snapshot(be.snapshot(ghost))

    with pytest.raises(exception.VolumeNotFound):
        drv.create_snapshot(be.snapshot(ghost))
    with pytest.raises(exception.VolumeNotFound):
        drv.extend_volume(ghost, 2)
    with pytest.raises(exception.VolumeNotFound):
        drv.create_cloned_volume(be.volume(1), ghost)
    with pytest.raises(exception.SnapshotNotFound):
        drv.create_volume_from_snapshot(be.volume(1), be.snapshot(vol))
    with pytest.raises(exception.SnapshotNotFound):
        drv.revert_to_snapshot(be.ctx, vol, be.snapshot(vol))
    with pytest.raises(exception.VolumeNotFound):
        drv.initialize_connection(ghost, {})
    with pytest.raises(exception.SnapshotNotFound):
        drv.initialize_connection_snapshot(be.snapshot(vol), {})

    # Same id, different parameters: EEXIST, the backend's message kept.
    with pytest.raises(exception.VolumeBackendAPIException, match='exists'):
        drv.create_volume(be.volume(2, id=vol.id))
    with pytest.raises(exception.VolumeDriverException, match='encrypted'):
        drv.create_volume(be.volume(1, encryption_key_id='00000000-0000-0000-0000-000000000001'))

    # Idempotent creates: the same request again succeeds.
    drv.create_volume(vol)
    drv.create_snapshot(snap)
    drv.delete_snapshot(snap)
    drv.delete_volume(vol)
    assert be.share_files() == ['.snapfs']


# -- stats ----------------------------------------------------------------------------------


def test_volume_stats(backend):
    be, drv = backend, backend.driver
    vols = [be.create_volume(1), be.create_volume(2)]
    write_at(be.path(vols[0]), 0, pattern(7, 4 * MiB))
    stats = drv.get_volume_stats(refresh=True)
    st = os.statvfs(be.share)
    assert stats['volume_backend_name'] == 'snapfs-test'
    assert stats['storage_protocol'] == 'file'
    assert stats['vendor_name'] and stats['driver_version'] == drv.VERSION
    assert stats['total_capacity_gb'] == pytest.approx(st.f_blocks * st.f_frsize / GiB, abs=0.01)
    assert 0 < stats['free_capacity_gb'] <= stats['total_capacity_gb']
    assert stats['provisioned_capacity_gb'] == 3
    assert stats['thin_provisioning_support'] is True
    assert stats['thick_provisioning_support'] is False
    assert stats['max_over_subscription_ratio'] == 5.0
    assert stats['reserved_percentage'] == 0
    assert stats['online_extend_support'] is True
    assert stats['multiattach'] is False
    assert stats['backend_state'] == 'up'
    for vol in vols:
        drv.delete_volume(vol)
    assert drv.get_volume_stats(refresh=True)['provisioned_capacity_gb'] == 0


# -- manage ---------------------------------------------------------------------------------


def test_manage_unmanaged_files(backend):
    be, drv = backend, backend.driver
    raw = os.path.join(be.share, 'imported.img')
    with open(raw, 'wb') as f:
        f.truncate(GiB + 4096)
        f.write(pattern(8, MiB))
    qsrc = os.path.join(str(be.tmp), 'src.raw')
    with open(qsrc, 'wb') as f:
        f.truncate(GiB)
        f.seek(2 * MiB)
        f.write(pattern(9, MiB))
    qcow = os.path.join(be.share, 'other.qcow2')
    subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', qsrc, qcow], check=True)
    known = be.create_volume(1)

    listed = drv.get_manageable_volumes([known], None, 1000, 0, ['size'], ['asc'])
    by_ref = {e['reference']['source-name']: e for e in listed}
    assert by_ref[f'{be.share}/imported.img']['safe_to_manage'] is True
    assert by_ref[f'{be.share}/imported.img']['size'] == 2
    assert by_ref[f'{be.share}/other.qcow2']['safe_to_manage'] is True
    mine = by_ref[f'{be.share}/volume-{known.id}']
    assert (mine['safe_to_manage'], mine['cinder_id']) == (False, known.id)

    ref = {'source-name': f'{be.share}/imported.img'}
    assert drv.manage_existing_get_size(be.volume(1), ref) == 2
    vol = be.volume(2)
    vol.update(drv.manage_existing(vol, ref))
    assert vol.provider_location == str(be.share)
    assert os.path.getsize(be.path(vol)) == GiB + 4096
    assert read_at(be.path(vol), 0, MiB) == pattern(8, MiB)
    assert 'imported.img' not in be.share_files()

    qref = {'source-name': 'other.qcow2', 'format': 'qcow2'}
    assert drv.manage_existing_get_size(be.volume(1), qref) == 1
    qvol = be.volume(1)
    qvol.update(drv.manage_existing(qvol, qref))
    assert same_content(be.path(qvol), qsrc)

    with pytest.raises(exception.ManageExistingInvalidReference):
        drv.manage_existing(be.volume(1), {'source-name': 'nothing-here'})
    with pytest.raises(exception.ManageExistingInvalidReference):
        drv.manage_existing_get_size(be.volume(1), {'source-name': 'x', 'format': 'vmdk'})

    drv.unmanage(qvol)  # Cinder forgets it; snapfs keeps serving it
    assert os.path.exists(be.path(qvol))
    for v in (vol, qvol, known):
        drv.delete_volume(v)
    assert be.share_files() == ['.snapfs']
