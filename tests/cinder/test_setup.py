"""do_setup mounting snapfs itself (scripts/mount.snapfs, as make install's /sbin/mount.snapfs),
reusing a mount, recovering a stale one, and refusing a broken configuration."""

import os

import pytest

from cinder import exception
from tests.cinder.conftest import Backend, MiB, pattern, read_at, write_at


def proc_mount(mountpoint):
    """(source, fstype, options) of the mount at ``mountpoint``, or None."""
    found = None
    with open('/proc/self/mounts') as f:
        for line in f:
            source, mnt, fstype, opts = line.split()[:4]
            if mnt == mountpoint:
                found = (source, fstype, opts)
    return found


def test_do_setup_mounts_the_share(tmp_path, cinder_env):
    be = Backend(tmp_path, cinder_env, group='snapfs-mounting')
    try:
        assert not os.path.exists(be.mnt)
        drv = be.load_driver()  # runs scripts/mount.snapfs through the driver's _execute
        source, fstype, opts = proc_mount(be.mnt)
        assert (source, fstype) == (str(be.share), 'fuse.snapfs')
        assert 'allow_other' in opts.split(',')
        vol = be.create_volume(1)
        write_at(be.path(vol), 0, pattern(40, MiB))

        # A second cinder-volume start finds the mount and reuses it (a second daemon over
        # the share would refuse to start: the share's lease).
        again = be.load_driver()
        assert again is not drv
        assert read_at(again.local_path(vol), 0, MiB) == pattern(40, MiB)
        again.delete_volume(vol)
    finally:
        be.close()
    assert proc_mount(be.mnt) is None


def test_a_stale_mount_is_remounted(tmp_path, cinder_env):
    """The daemon died (kill -9): the mount answers ENOTCONN; the next operation lazily
    unmounts it and mounts snapfs again, and the share's data is all there."""
    be = Backend(tmp_path, cinder_env, group='snapfs-stale')
    try:
        be.premount()
        drv = be.load_driver()
        vol = be.create_volume(1)
        write_at(be.path(vol), 0, pattern(41, MiB))
        be.mount.proc.kill()  # the daemon this test started
        be.mount.proc.wait()
        with pytest.raises(OSError):
            os.stat(be.path(vol))
        snap = be.create_snapshot(vol)  # remounts first
        be.mount = None  # the new daemon is the driver's: close() unmounts by path
        assert proc_mount(be.mnt)[1] == 'fuse.snapfs'
        assert read_at(be.snapshot_path(snap), 0, MiB) == pattern(41, MiB)
        drv.delete_snapshot(snap)
        drv.delete_volume(vol)
    finally:
        be.close()


def test_configuration_errors(tmp_path, cinder_env):
    be = Backend(tmp_path, cinder_env, group='snapfs-bad',
                 snapfs_shares_config=str(tmp_path / 'missing'))
    try:
        with pytest.raises(exception.VolumeDriverException, match='does not exist'):
            be.load_driver()
    finally:
        be.close()

    shares = tmp_path / 'bad_shares'
    shares.write_text('not-a-share\n/nonexistent/share/dir\n')
    be = Backend(tmp_path, cinder_env, group='snapfs-bad2', snapfs_shares_config=str(shares))
    try:
        with pytest.raises(exception.VolumeDriverException, match='No snapfs share answers'):
            be.load_driver()
        assert list(be.driver.shares) == ['/nonexistent/share/dir']
    finally:
        be.close()
