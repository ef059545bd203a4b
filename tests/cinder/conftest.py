"""The Cinder driver against a live snapfs mount, driven with Cinder's own objects and
configuration; outcomes are checked on the mount and the share, nothing is mocked but Glance.

Nothing here may import ``cinder.tests.unit`` (or the compliance module, which imports it): that
package monkey-patches the whole process with eventlet, and the trio tests share this pytest
process. Volumes and snapshots are real ``cinder.objects`` built with an admin context and
every field the driver reads set (nothing is lazy-loaded from a database).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from oslo_config import cfg
from oslo_utils import importutils
from oslo_utils import units

from cinder import context as cinder_context
from cinder import objects
from cinder.volume import configuration
from cinder.volume import driver as base_driver
from cinder_driver import options
from tests.mount.conftest import REPO, start, unmount

objects.register_all()

CONF = cfg.CONF
DRIVER = 'cinder_driver.driver.SnapfsDriver'
HOST = 'testhost@snapfs#snapfs'
MOUNT_HELPER = os.path.join(REPO, 'scripts', 'mount.snapfs')


def mount_point(base, share) -> str:
    """Where the driver mounts ``share`` (upstream's rule: md5 of the share string)."""
    return os.path.join(str(base), hashlib.md5(str(share).encode()).hexdigest())


@pytest.fixture
def cinder_env(tmp_path, monkeypatch):
    """Process-wide Cinder settings for one test, undone afterwards.

    The tests run as root, so privsep entry points (os-brick's ``dd`` device check, Cinder's
    image format inspector) run in-process: what the privsep daemon would run, minus sudo."""
    from os_brick import privileged as brick_privileged

    import cinder.privsep
    if os.geteuid() != 0:
        pytest.fail('the Cinder driver tests mount snapfs and run as root')
    overrides = {'state_path': str(tmp_path / 'state'),
                 'image_conversion_dir': str(tmp_path / 'conversion')}
    for key, value in overrides.items():
        CONF.set_override(key, value)
    contexts = (brick_privileged.default, cinder.privsep.sys_admin_pctxt)
    for pctxt in contexts:
        pctxt.set_client_mode(False)
    monkeypatch.setenv('SNAPFS_PYTHON', sys.executable)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
    try:
        yield cinder_context.get_admin_context()
    finally:
        for pctxt in contexts:
            pctxt.set_client_mode(True)
        for key in overrides:
            CONF.clear_override(key)


class Backend:
    """One configured backend: a share directory, the driver, and helpers for Cinder objects."""

    def __init__(self, tmp_path, ctx, group='snapfs-test', **conf):
        self.tmp = tmp_path
        self.ctx = ctx
        self.group = group
        self.share = tmp_path / 'share'
        self.share.mkdir(exist_ok=True)
        self.base = tmp_path / 'mnt'
        self.mnt = mount_point(self.base, self.share)
        self.mount = None
        shares_file = tmp_path / 'snapfs_shares'
        shares_file.write_text(f'# the test share\n{self.share}\n')
        self.conf = configuration.Configuration(base_driver.volume_opts, config_group=group)
        self.conf.append_config_values(options.snapfs_opts)
        settings = {'snapfs_shares_config': str(shares_file),
                    'snapfs_mount_point_base': str(self.base),
                    'snapfs_mount_helper': MOUNT_HELPER,
                    'snapfs_mount_options': f'allow_other,log={tmp_path}/snapfs-driver.log',
                    'snapfs_control_timeout': 60,
                    'volume_backend_name': 'snapfs-test',
                    'max_over_subscription_ratio': '5.0'}
        settings.update(conf)
        self._overrides = list(settings)
        for key, value in settings.items():
            CONF.set_override(key, value, group=group)
        self.volume_type = objects.VolumeType(ctx, id=str(uuid.uuid4()), name='snapfs',
                                              extra_specs={})
        self.driver = None

    def premount(self):
        """Mount snapfs where the driver expects it, as a child of the test (logs, waits)."""
        self.mount = start(self.share, self.mnt, 'allow_other', log=str(self.tmp / 'snapfs.log'))

    def load_driver(self):
        """As cinder-volume does: import the configured class, then do_setup and check."""
        self.driver = importutils.import_object(
            DRIVER, configuration=self.conf, host='testhost@snapfs', cluster_name=None,
            is_vol_db_empty=True, active_backend_id=None)
        self.driver.do_setup(self.ctx)
        self.driver.check_for_setup_error()
        return self.driver

    def close(self):
        try:
            if self.mount is not None:
                self.mount.unmount()
            else:
                unmount(self.mnt)
        finally:
            for key in self._overrides:
                CONF.clear_override(key, group=self.group)

    # -- Cinder objects ---------------------------------------------------------------------

    def volume(self, size=1, **fields):
        vol = objects.Volume(
            context=self.ctx, id=str(uuid.uuid4()), _name_id=None, size=size,
            status='creating', host=HOST, display_name='test', provider_location=None,
            encryption_key_id=None, volume_type_id=self.volume_type.id,
            volume_type=self.volume_type, glance_metadata={}, admin_metadata={},
            metadata={}, project_id='project', user_id='user')
        vol.update(fields)
        return vol

    def create_volume(self, size=1, **fields):
        vol = self.volume(size, **fields)
        vol.update(self.driver.create_volume(vol) or {})
        vol.status = 'available'
        return vol

    def snapshot(self, vol, **fields):
        snap = objects.Snapshot(
            context=self.ctx, id=str(uuid.uuid4()), volume_id=vol.id, volume=vol,
            volume_size=vol.size, status='creating', display_name='snap',
            project_id='project', user_id='user')
        snap.update(fields)
        return snap

    def create_snapshot(self, vol):
        snap = self.snapshot(vol)
        self.driver.create_snapshot(snap)
        snap.status = 'available'
        return snap

    # -- what the mount and the share show --------------------------------------------------

    def path(self, vol) -> str:
        return os.path.join(self.mnt, 'volume-' + vol.name_id)

    def snapshot_path(self, snap) -> str:
        return os.path.join(self.mnt, '.snapshots', 'volume-' + snap.volume.name_id, snap.id)

    def share_files(self) -> list:
        return sorted(os.listdir(self.share))


@pytest.fixture
def backend(tmp_path, cinder_env):
    """A driver set up over a fresh share, snapfs pre-mounted at its mount point."""
    be = Backend(tmp_path, cinder_env)
    try:
        be.premount()
        be.load_driver()
        yield be
    finally:
        be.close()


# -- data helpers ---------------------------------------------------------------------------

def pattern(seed: int, size: int) -> bytes:
    """Incompressible, distinct per seed."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b'%d-%d' % (seed, counter)).digest()
        counter += 1
    return bytes(out[:size])


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, 'rb') as f:
        f.seek(offset)
        return f.read(size)


def same_content(a: str, b: str, fmt_a='raw', fmt_b='raw') -> bool:
    """qemu-img is the oracle: the same guest content (sizes are checked separately)."""
    # -T none: O_DIRECT reads, several times faster through FUSE than the page cache.
    for cache in (['-T', 'none'], []):
        r = subprocess.run(['qemu-img', 'compare', '-U'] + cache + ['-f', fmt_a, '-F', fmt_b,
                                                                    a, b],
                           capture_output=True, text=True)
        if r.returncode in (0, 1):
            return r.returncode == 0
    raise AssertionError(f'qemu-img compare {a} {b}: {r.stderr}')


class FakeImageService:
    """Glance stand-in (the only mock): ``download`` writes the image file into the stream
    Cinder hands it, ``update`` stores what Cinder uploads in a (sparse) file."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.images = {}
        self.uploads = {}
        self.temp_images = None

    def add(self, path, disk_format, container_format='bare') -> str:
        image_id = str(uuid.uuid4())
        meta = {'id': image_id, 'name': os.path.basename(path), 'status': 'active',
                'disk_format': disk_format, 'container_format': container_format,
                'size': os.path.getsize(path), 'properties': {}}
        self.images[image_id] = (meta, path)
        return image_id

    def new_image(self, disk_format) -> dict:
        image_id = str(uuid.uuid4())
        meta = {'id': image_id, 'name': 'upload', 'status': 'queued',
                'disk_format': disk_format, 'container_format': 'bare', 'properties': {}}
        self.images[image_id] = (meta, None)
        return meta

    def show(self, context, image_id):
        return dict(self.images[image_id][0])

    def download(self, context, image_id, data=None):
        with open(self.images[image_id][1], 'rb') as f:
            shutil.copyfileobj(f, data, 1 << 20)

    def update(self, context, image_id, image_meta, data=None, purge_props=True,
               store_id=None, base_image_ref=None):
        path = os.path.join(str(self.tmp), f'upload-{image_id}')
        size = 0
        with open(path, 'wb') as out:
            while True:
                chunk = data.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
            out.truncate(size)
        self.uploads[image_id] = path
        return self.show(context, image_id)


GiB = units.Gi
MiB = units.Mi
