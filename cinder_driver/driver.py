"""Cinder volume driver for snapfs: file-based volumes with snapshots, clones and reverts.

snapfs is a FUSE filesystem mounted over an NFS export (or any directory). The share keeps
upstream Cinder's NFS layout (``volume-<id>``, ``volume-<id>.<snap-id>``, ``volume-<id>.info``);
the mount shows every volume as one plain RAW file, ``<mount>/volume-<id>``, and snapshots as
read-only raw files under ``<mount>/.snapshots/``. All chain work (qcow2 overlays, merges,
reverts) happens inside snapfs. This driver stays thin: every operation is ONE request on the
driver's own control file in the mount (CONTRACT.md section 3), naming volumes by
``volume.name_id`` and snapshots by ``snapshot.id``. It holds no qcow2 or chain code and never
runs qemu-img on a volume's chain.

Connection type: ``gpfs``
-------------------------
``initialize_connection`` returns ``{'driver_volume_type': 'gpfs', 'data': {'device_path':
<mount>/volume-<id>, 'format': 'raw', ...}}``.

- It must NOT be ``nfs``: Nova's NFS volume driver would mount the bare export itself and open
  ``volume-<id>`` on it -- for a volume with snapshots that is a frozen snapshot base (and the
  raw view of a qcow2 base otherwise). The guest would write into a snapshot: silent corruption.
- Nova maps ``gpfs`` to ``LibvirtGPFSVolumeDriver``: no mount of its own, ``connect_volume``
  does nothing, and the libvirt disk is ``<disk type='file'>`` with ``source file=device_path``,
  driver format raw, cache none (QEMU opens the file with O_DIRECT, which the snapfs mount
  accepts). That is exactly "open this file inside an existing mount".
- ``local`` would also reach the path on the Cinder side, but Nova maps it to
  ``LibvirtVolumeDriver``, which writes ``<disk type='block'>``: QEMU's host_device driver refuses
  a regular file. ``gpfs`` works on both sides.
- os-brick (Cinder's own attaches for image copy, backup, migration) maps ``gpfs`` to
  ``GPFSConnector``, a ``LocalConnector`` returning ``device_path`` unchanged.

Many hosts: the path must exist on the compute host too. Every compute host mounts the same
shares with snapfs at the same place (``snapfs attach-mounts --base <snapfs_mount_point_base>
--shares-config <snapfs_shares_config>``, see ``snapfs.attach``); the daemons of all hosts
share each share safely (one owner per volume at a time, requests for a volume go to its
owner, a guest write moves ownership to the writing host). Online extend: snapfs grows a volume while it is
open (the stats say ``online_extend_support``); Nova's GPFS volume driver has no
``extend_volume``, so a running guest sees the new size only after a re-attach or a
``virsh blockresize`` (see README.md next to this file).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re

from eventlet import timeout as eventlet_timeout
from eventlet import tpool
from os_brick.remotefs import remotefs as remotefs_brick
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils import units

from cinder.common import constants
from cinder import exception
from cinder.i18n import _
from cinder.image import accelerator
from cinder.image import image_utils
from cinder import interface
from cinder import utils
from cinder.volume import driver
from cinder.volume import volume_utils
from cinder_driver import options
from snapfs import attach, ctl

LOG = logging.getLogger(__name__)

VERSION = '1.0.0'
PREFIX = 'volume-'
SNAPSHOTS = '.snapshots'


def _control(mountpoint: str, op: str, args: dict) -> dict:
    """One control request on a private request file (runs in a native thread)."""
    with ctl.Client(mountpoint) as client:
        return client.request(op, **args)


def _read_status(mountpoint: str) -> dict:
    with open(os.path.join(mountpoint, ctl.STATUS), 'rb') as f:
        return json.loads(f.read())


def _mount_state(mountpoint: str) -> str:
    """'none', 'snapfs', 'stale' (daemon gone) or 'other' (another filesystem)."""
    fstype = None
    with open('/proc/self/mounts') as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and _unescape(fields[1]) == mountpoint:
                fstype = fields[2]  # the last one listed is the one on top
    if fstype is None:
        return 'none'
    if fstype != 'fuse.snapfs':
        return 'other'
    try:
        os.stat(os.path.join(mountpoint, ctl.STATUS))
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return 'stale'
    return 'snapfs'


def _unescape(field: str) -> str:
    return re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)), field)


def _gib(size_bytes: int) -> int:
    return int(math.ceil(size_bytes / float(units.Gi)))


@interface.volumedriver
class SnapfsDriver(driver.VolumeDriver):
    """snapfs: volumes as raw files in a FUSE mount over an NFS share, with snapshots.

    Snapshots are O(1) and work while a volume is attached (no Nova assistance); any snapshot
    can be reverted to or cloned from; the share stays readable by the upstream NFS driver.
    """

    VERSION = VERSION
    CI_WIKI_NAME = 'snapfs'  # out of tree: no Cinder third-party CI page
    driver_volume_type = 'gpfs'
    volume_backend_name = 'snapfs'
    vendor_name = 'Open Source'

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(options.snapfs_opts)
        self.shares: dict[str, str | None] = {}  # share -> NFS mount flags
        self.base = None
        self._nfs = None
        self._as_root = True
        self._format = 'raw'
        self._mosr: float | str = 20.0

    @staticmethod
    def get_driver_options():
        return options.snapfs_opts

    # -- setup ------------------------------------------------------------------------------

    def do_setup(self, context):
        """Mount every configured share: its NFS export (unless local), then snapfs over it."""
        super().do_setup(context)
        conf = self.configuration
        self.base = os.path.realpath(conf.snapfs_mount_point_base)
        self._as_root = not conf.snapfs_secure_file_operations
        self._format = 'qcow2' if conf.snapfs_qcow2_volumes else 'raw'
        self._mosr = volume_utils.get_max_over_subscription_ratio(
            conf.max_over_subscription_ratio, supports_auto=True)
        self.shares = self._load_shares(conf.snapfs_shares_config)
        for share in self.shares:
            try:
                self._ensure_mounted(share)
            except Exception:
                LOG.exception('Could not mount snapfs share %s', share)

    def check_for_setup_error(self):
        """Every share's control file must answer a ``list`` (one answering share suffices)."""
        answering = []
        for share in self.shares:
            try:
                self._request(share, 'list')
                answering.append(share)
            except Exception as exc:
                LOG.error('snapfs share %(share)s does not answer: %(exc)s',
                          {'share': share, 'exc': exc})
        if not answering:
            raise exception.VolumeDriverException(message=_(
                'No snapfs share answers; check %(file)s and the mount logs under %(base)s.')
                % {'file': self.configuration.snapfs_shares_config, 'base': self.base})
        LOG.info('snapfs shares ready: %s', ', '.join(answering))

    def _load_shares(self, path: str) -> dict:
        if not path or not os.path.exists(path):
            raise exception.VolumeDriverException(message=_(
                'snapfs shares config %s does not exist (snapfs_shares_config).') % path)
        shares = attach.read_shares(path, on_bad=lambda address: LOG.error(
            'Share %s ignored: it must be host:/export or an absolute local path.', address))
        LOG.debug('snapfs shares loaded: %s', shares)
        return shares

    # -- mounts -----------------------------------------------------------------------------

    def _mount_point(self, share: str) -> str:
        return attach.mount_point(self.base, share)

    def _nfs_client(self):
        if self._nfs is None:
            self._nfs = remotefs_brick.RemoteFsClient(
                'nfs', utils.get_root_helper(), execute=self._execute,
                nfs_mount_point_base=os.path.join(self.base, '.shares'),
                nfs_mount_options=self.configuration.snapfs_nfs_mount_options)
        return self._nfs

    def _share_dir(self, share: str) -> str:
        """The directory snapfs serves: a local path as is, an NFS export mounted first."""
        if os.path.isabs(share):
            if not os.path.isdir(share):
                raise exception.VolumeDriverException(message=_(
                    'snapfs share %s is not a directory.') % share)
            return share
        flags = self.shares.get(share)
        self._nfs_client().mount(share, flags.split() if flags else None)
        return self._nfs_client().get_mount_point(share)

    def _ensure_mounted(self, share: str) -> str:
        mnt = self._mount_point(share)
        state = _mount_state(mnt)
        if state == 'snapfs':
            return mnt
        if state == 'other':
            raise exception.VolumeDriverException(message=_(
                '%(mnt)s (for %(share)s) is mounted, but not by snapfs.')
                % {'mnt': mnt, 'share': share})
        if state == 'stale':
            LOG.warning('snapfs mount %s of %s lost its daemon: remounting', mnt, share)
            self._execute('umount', '-l', mnt, run_as_root=True)
        self._mount(share, mnt)
        return mnt

    def _mount(self, share: str, mnt: str) -> None:
        source = self._share_dir(share)
        self._execute('mkdir', '-p', mnt)
        cmd = [self.configuration.snapfs_mount_helper, source, mnt]
        opts = self._snapfs_mount_options()
        if opts:
            cmd += ['-o', opts]
        try:
            self._execute(*cmd, run_as_root=True)
        except (OSError, processutils.ProcessExecutionError) as exc:
            reason = getattr(exc, 'stderr', None) or str(exc)
            raise exception.VolumeDriverException(message=_(
                'mount.snapfs %(share)s %(mnt)s failed: %(reason)s')
                % {'share': share, 'mnt': mnt, 'reason': reason.strip()})
        LOG.info('Mounted snapfs over %(share)s at %(mnt)s', {'share': share, 'mnt': mnt})

    def _snapfs_mount_options(self) -> str:
        conf = self.configuration
        opts = [o for o in (conf.snapfs_mount_options or '').split(',') if o]
        group = conf.snapfs_ctl_group
        if not group and os.geteuid() != 0:
            group = str(os.getegid())
        if group:
            opts.append('ctl_gid=%s' % group)
        if conf.snapfs_secure_file_operations:
            opts += ['uid=%d' % os.geteuid(), 'gid=%d' % os.getegid(), 'mode=660']
        return ','.join(opts)

    # -- control requests -------------------------------------------------------------------

    def _blocking(self, what: str, fn, *args):
        """Run ``fn`` in a native thread (a FUSE request blocks the whole eventlet hub
        otherwise), failing after snapfs_control_timeout seconds."""
        limit = self.configuration.snapfs_control_timeout
        timer = eventlet_timeout.Timeout(limit)
        try:
            return tpool.execute(fn, *args)
        except eventlet_timeout.Timeout as exc:
            if exc is not timer:
                raise
            raise exception.VolumeBackendAPIException(data=_(
                '%(what)s did not finish within %(limit)d s (snapfs_control_timeout); it may '
                'still complete.') % {'what': what, 'limit': limit}) from None
        finally:
            timer.cancel()

    def _request(self, share: str, op: str, errors: dict | None = None, **args) -> dict:
        """One control request. ``errors`` maps an errno to a callable returning the Cinder
        exception to raise (or None: the outcome is what the caller wanted)."""
        mnt = self._ensure_mounted(share)
        LOG.debug('snapfs %(op)s on %(share)s: %(args)s', {'op': op, 'share': share, 'args': args})
        try:
            return self._blocking('snapfs %s on %s' % (op, share), _control, mnt, op, args)
        except ctl.ControlError as exc:
            make = (errors or {}).get(exc.errno)
            if make is None:
                raise self._backend_error(share, op, exc) from exc
            error = make()
            if error is None:
                LOG.debug('snapfs %s: %s (nothing to do)', op, exc)
                return {}
            LOG.warning('snapfs %(op)s failed: %(exc)s', {'op': op, 'exc': exc})
            raise error from exc

    @staticmethod
    def _backend_error(share, op, exc):
        if exc.errno == errno.ENOSPC:
            data = _('snapfs share %(share)s is full (%(op)s): %(msg)s')
        else:
            data = _('snapfs %(op)s failed on %(share)s: %(msg)s')
        return exception.VolumeBackendAPIException(
            data=data % {'share': share, 'op': op, 'msg': exc})

    def _status(self, share: str) -> dict:
        mnt = self._ensure_mounted(share)
        return self._blocking('reading the status of %s' % share, _read_status, mnt)

    @staticmethod
    def _share(volume) -> str:
        if not volume.provider_location:
            raise exception.InvalidVolume(reason=_(
                'volume %s has no provider_location (its snapfs share)') % volume.id)
        return volume.provider_location

    def local_path(self, volume) -> str:
        """The volume's raw file in the snapfs mount."""
        return os.path.join(self._mount_point(self._share(volume)), PREFIX + volume.name_id)

    def _snapshot_path(self, snapshot) -> str:
        volume = snapshot.volume
        return os.path.join(self._mount_point(self._share(volume)), SNAPSHOTS,
                            PREFIX + volume.name_id, snapshot.id)

    # -- volumes ----------------------------------------------------------------------------

    @staticmethod
    def _refuse_encrypted(volume) -> None:
        if volume.encryption_key_id:
            raise exception.VolumeDriverException(message=_(
                'The snapfs driver does not support encrypted volumes yet.'))

    def _find_share(self, volume) -> str:
        """The share with the most free space among those not over-subscribed."""
        size = volume.size * units.Gi
        best, best_free = None, -1
        for share in self.shares:
            try:
                status = self._status(share)
            except Exception as exc:
                LOG.warning('snapfs share %(share)s skipped: %(exc)s',
                            {'share': share, 'exc': exc})
                continue
            provisioned = sum(v['provisioned'] for v in status['volumes'])
            if (self._mosr != 'auto' and
                    provisioned + size > status['total_bytes'] * float(self._mosr)):
                continue
            if status['free_bytes'] > best_free:
                best, best_free = share, status['free_bytes']
        if best is None:
            raise exception.RemoteFSNoSuitableShareFound(volume_size=volume.size)
        return best

    def create_volume(self, volume):
        self._refuse_encrypted(volume)
        share = self._find_share(volume)
        self._request(share, 'create-volume', {
            errno.ENOSPC: lambda: exception.RemoteFSNoSuitableShareFound(
                volume_size=volume.size)},
            volume=volume.name_id, size=volume.size * units.Gi, format=self._format)
        return {'provider_location': share}

    def delete_volume(self, volume):
        """Deletes the volume's files; a volume that is already gone is fine."""
        if not volume.provider_location:
            LOG.warning('Volume %s has no provider_location: nothing to delete', volume.id)
            return
        self._request(volume.provider_location, 'delete-volume', {
            errno.EBUSY: lambda: exception.VolumeIsBusy(volume_name=volume.name)},
            volume=volume.name_id)

    def create_cloned_volume(self, volume, src_vref):
        """An independent copy, also of an attached volume, at the new volume's size."""
        self._refuse_encrypted(volume)
        share = self._share(src_vref)
        self._request(share, 'clone', {
            errno.ENOENT: lambda: exception.VolumeNotFound(volume_id=src_vref.id),
            errno.ENOSPC: lambda: exception.RemoteFSNoSuitableShareFound(
                volume_size=volume.size)},
            volume=volume.name_id, source_volume=src_vref.name_id,
            size=volume.size * units.Gi, format=self._format)
        return {'provider_location': share}

    def extend_volume(self, volume, new_size):
        """Grows the volume, also while attached."""
        self._request(self._share(volume), 'extend-volume', {
            errno.ENOENT: lambda: exception.VolumeNotFound(volume_id=volume.id)},
            volume=volume.name_id, size=new_size * units.Gi)

    # -- snapshots --------------------------------------------------------------------------

    def create_snapshot(self, snapshot):
        """O(1), also of an attached volume: no Nova assistance needed."""
        volume = snapshot.volume
        self._request(self._share(volume), 'create-snapshot', {
            errno.ENOENT: lambda: exception.VolumeNotFound(volume_id=volume.id)},
            volume=volume.name_id, snapshot=snapshot.id)

    def delete_snapshot(self, snapshot):
        """Also of an attached volume; a snapshot (or volume) already gone is fine."""
        volume = snapshot.volume
        if not volume.provider_location:
            LOG.warning('Snapshot %s: its volume has no provider_location', snapshot.id)
            return
        self._request(volume.provider_location, 'delete-snapshot', {
            errno.ENOENT: lambda: None,
            errno.EBUSY: lambda: exception.SnapshotIsBusy(snapshot_name=snapshot.name)},
            volume=volume.name_id, snapshot=snapshot.id)

    def create_volume_from_snapshot(self, volume, snapshot):
        self._refuse_encrypted(volume)
        share = self._share(snapshot.volume)
        self._request(share, 'clone', {
            errno.ENOENT: lambda: exception.SnapshotNotFound(snapshot_id=snapshot.id),
            errno.ENOSPC: lambda: exception.RemoteFSNoSuitableShareFound(
                volume_size=volume.size)},
            volume=volume.name_id, source_volume=snapshot.volume.name_id,
            source_snapshot=snapshot.id, size=volume.size * units.Gi, format=self._format)
        return {'provider_location': share}

    def revert_to_snapshot(self, context, volume, snapshot):
        """Any snapshot, not only the latest; the volume keeps its current size."""
        self._request(self._share(volume), 'revert', {
            errno.ENOENT: lambda: exception.SnapshotNotFound(snapshot_id=snapshot.id)},
            volume=volume.name_id, snapshot=snapshot.id)

    # -- connections ------------------------------------------------------------------------

    def initialize_connection(self, volume, connector, **kwargs):
        """The volume's raw file in the snapfs mount (see the module docstring)."""
        share = self._share(volume)
        info = self._request(share, 'info', {
            errno.ENOENT: lambda: exception.VolumeNotFound(volume_id=volume.id)},
            volume=volume.name_id)
        if info.get('state') != 'ok':
            raise exception.InvalidVolume(reason=_('snapfs marks volume %(id)s failed: '
                                                   '%(reason)s')
                                          % {'id': volume.id, 'reason': info.get('reason')})
        if _gib(info['size']) > volume.size:
            # As upstream's NFS driver: a size nobody asked Cinder for is suspicious.
            raise exception.InvalidVolume(reason=_(
                'volume %(id)s is %(size)d bytes on snapfs, more than its %(gb)d GiB')
                % {'id': volume.id, 'size': info['size'], 'gb': volume.size})
        return self._connection(self.local_path(volume), volume.name, share)

    def initialize_connection_snapshot(self, snapshot, connector, **kwargs):
        """The snapshot's read-only raw file (backups from a temporary snapshot)."""
        path = self._snapshot_path(snapshot)
        if not self._blocking('looking up %s' % path, os.path.exists, path):
            raise exception.SnapshotNotFound(snapshot_id=snapshot.id)
        conn = self._connection(path, snapshot.name, self._share(snapshot.volume))
        conn['data']['access_mode'] = 'ro'
        return conn

    def _connection(self, path: str, name: str, share: str) -> dict:
        return {'driver_volume_type': self.driver_volume_type,
                'data': {'device_path': path, 'name': name, 'format': 'raw',
                         'export': share}}

    def terminate_connection(self, volume, connector, **kwargs):
        pass

    def terminate_connection_snapshot(self, snapshot, connector, **kwargs):
        pass

    def create_export(self, context, volume, connector):
        pass

    def ensure_export(self, context, volume):
        if volume.provider_location:
            self._ensure_mounted(volume.provider_location)

    def remove_export(self, context, volume):
        pass

    def create_export_snapshot(self, context, snapshot, connector):
        pass

    def remove_export_snapshot(self, context, snapshot):
        pass

    def secure_file_operations_enabled(self):
        return bool(self.configuration.snapfs_secure_file_operations)

    # -- images -----------------------------------------------------------------------------

    def copy_image_to_volume(self, context, volume, image_service, image_id,
                             disable_sparse=False):
        """Writes the image into the volume's existing raw file (``qemu-img convert -n``).

        Cinder's fetch_to_raw lets qemu-img create the destination, which truncates it to 0;
        a snapfs volume, like a block device, keeps its size (EINVAL). So this follows
        fetch_to_volume_format's checks with Cinder's own helpers and converts with -n.
        """
        self._refuse_encrypted(volume)
        path = self.local_path(volume)
        meta = image_service.show(context, image_id)
        image_utils.check_image_conversion_disable(meta['disk_format'], 'raw', image_id)
        with image_utils.temporary_file(prefix='image_download_%s_' % image_id) as tmp:
            cached = image_utils.TemporaryImages.for_image_service(image_service).get(
                context, image_id)
            if cached:
                tmp = cached
            else:
                image_utils.fetch(context, image_service, image_id, tmp, None, None)
            self._unpack(meta, tmp, image_id)
            data = image_utils.qemu_img_info(tmp, run_as_root=self._as_root)
            image_utils.check_virtual_size(data.virtual_size, volume.size, image_id)
            if data.backing_file is not None:
                raise exception.ImageUnacceptable(image_id=image_id, reason=_(
                    'fmt=%(fmt)s backed by: %(backing)s')
                    % {'fmt': data.file_format, 'backing': data.backing_file})
            # The raw file must hold the whole image: grow it to the size Cinder has.
            self.extend_volume(volume, volume.size)
            image_utils.convert_image(
                tmp, path, 'raw', src_format=image_utils.fixup_disk_format(meta['disk_format']),
                run_as_root=self._as_root, image_id=image_id, data=data,
                disable_sparse=disable_sparse, skip_create=True)

    def _unpack(self, meta: dict, tmp: str, image_id: str) -> None:
        """Compressed containers and XenServer tarballs, as fetch_to_volume_format does."""
        if meta.get('container_format') == 'compressed':
            if not accelerator.is_gzip_compressed(tmp):
                raise exception.ImageUnacceptable(image_id=image_id, reason=_(
                    'Unsupported compressed image format found. Only gzip is supported '
                    'currently'))
            accelerator.ImageAccel(tmp, tmp).decompress_img(run_as_root=self._as_root)
        if image_utils.is_xenserver_format(meta):
            image_utils.replace_xenserver_image_with_coalesced_vhd(tmp)

    def copy_volume_to_image(self, context, volume, image_service, image_meta):
        """Uploads the volume's raw file (converted by Cinder if the image format asks)."""
        volume_utils.upload_volume(context, image_service, image_meta,
                                   self.local_path(volume), volume,
                                   run_as_root=self._as_root)

    # -- manage / unmanage ------------------------------------------------------------------

    def _manage_ref(self, existing_ref: dict) -> tuple[str, str, str, int]:
        """(share, file name, format, size) of an unmanaged file on a share.

        ``source-name`` is ``<share>/<file>`` (as listed by get_manageable_volumes) or a bare
        file name; ``format`` (raw or qcow2) is optional, raw by default: the driver never
        guesses a format from data a guest may have written.
        """
        name = existing_ref.get('source-name')
        fmt = existing_ref.get('format', 'raw')

        def invalid(reason):
            return exception.ManageExistingInvalidReference(existing_ref=existing_ref,
                                                            reason=reason)
        if not name:
            raise invalid(_('The reference must contain "source-name".'))
        if fmt not in ('raw', 'qcow2'):
            raise invalid(_('"format" must be raw or qcow2.'))
        candidates = [(share, name[len(share.rstrip('/')) + 1:]) for share in self.shares
                      if name.startswith(share.rstrip('/') + '/')]
        if not candidates and '/' not in name:
            candidates = [(share, name) for share in self.shares]
        for share, file_name in candidates:
            for entry in self._request(share, 'list', unmanaged=True)['unmanaged']:
                if entry['name'] == file_name:
                    return share, file_name, fmt, entry['size']
        raise invalid(_('No unmanaged file %s on the snapfs shares.') % name)

    def manage_existing_get_size(self, volume, existing_ref):
        share, name, fmt, size = self._manage_ref(existing_ref)
        if fmt == 'qcow2':
            # One stand-alone file, format given by the admin (not probed); snapfs refuses
            # one with a backing file at manage time.
            path = os.path.join(self._share_dir(share), name)
            info = image_utils.qemu_img_info(path, run_as_root=self._as_root,
                                             img_format='qcow2')
            if info.file_format != 'qcow2' or info.backing_file:
                raise exception.ManageExistingInvalidReference(
                    existing_ref=existing_ref,
                    reason=_('%s is not a stand-alone qcow2 image') % name)
            size = info.virtual_size
        return _gib(size)

    def manage_existing(self, volume, existing_ref):
        """Renames the file into ``volume-<name_id>`` on its share (snapfs ``manage``)."""
        share, name, fmt, _size = self._manage_ref(existing_ref)

        def invalid(exc_reason):
            return lambda: exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=exc_reason)
        self._request(share, 'manage', {
            errno.EINVAL: invalid(_('snapfs refuses the file (a backing file, or not a valid '
                                    '%s image)') % fmt),
            errno.ENOENT: invalid(_('the file is gone')),
            errno.EEXIST: invalid(_('a snapfs volume named %s exists') % volume.name_id)},
            volume=volume.name_id, source=name, format=fmt)
        return {'provider_location': share}

    def unmanage(self, volume):
        """Cinder forgets the volume; it stays on the share as a snapfs volume."""
        LOG.info('Volume %s unmanaged: it stays on its share as volume-%s',
                 volume.id, volume.name_id)

    def get_manageable_volumes(self, cinder_volumes, marker, limit, offset, sort_keys,
                               sort_dirs):
        managed = {vol.name_id: vol for vol in cinder_volumes}
        entries = []
        for share in self.shares:
            try:
                unmanaged = self._request(share, 'list', unmanaged=True)['unmanaged']
                status = self._status(share)
            except Exception as exc:
                LOG.error('Cannot list manageable volumes on %(share)s: %(exc)s',
                          {'share': share, 'exc': exc})
                continue
            prefix = share.rstrip('/') + '/'
            for entry in unmanaged:
                entries.append(self._manageable(
                    prefix + entry['name'], _gib(entry['size']), None, None,
                    _('size of the file; pass "format": "qcow2" in the reference for a '
                      'qcow2 image')))
            for vol in status['volumes']:
                known = managed.get(vol['volume'])
                reason = (_('Volume already managed.') if known else
                          _('A snapfs volume not known to Cinder (unmanaged): snapfs cannot '
                            'rename a volume yet.'))
                entries.append(self._manageable(
                    prefix + PREFIX + vol['volume'], _gib(vol['provisioned']), reason,
                    known.id if known else None, None))
        return volume_utils.paginate_entries_list(entries, marker, limit, offset,
                                                  sort_keys, sort_dirs)

    @staticmethod
    def _manageable(ref, size, reason, cinder_id, extra):
        return {'reference': {'source-name': ref}, 'size': size,
                'safe_to_manage': reason is None, 'reason_not_safe': reason,
                'cinder_id': cinder_id, 'extra_info': extra}

    # -- stats ------------------------------------------------------------------------------

    def _update_volume_stats(self):
        total = free = provisioned = 0
        up = 0
        for share in self.shares:
            try:
                status = self._status(share)
            except Exception as exc:
                LOG.warning('No status from snapfs share %(share)s: %(exc)s',
                            {'share': share, 'exc': exc})
                continue
            up += 1
            total += status['total_bytes']
            free += status['free_bytes']
            for vol in status['volumes']:
                provisioned += vol['provisioned']
                if vol.get('state') != 'ok':
                    LOG.warning('snapfs volume %(vol)s on %(share)s failed: %(reason)s',
                                {'vol': vol['volume'], 'share': share,
                                 'reason': vol.get('reason')})
        conf = self.configuration
        self._stats = {
            'volume_backend_name': (conf.safe_get('volume_backend_name') or
                                    self.volume_backend_name),
            'vendor_name': self.vendor_name,
            'driver_version': self.VERSION,
            'storage_protocol': constants.FILE,
            'total_capacity_gb': round(total / float(units.Gi), 2),
            'free_capacity_gb': round(free / float(units.Gi), 2),
            'provisioned_capacity_gb': round(provisioned / float(units.Gi), 2),
            'reserved_percentage': conf.reserved_percentage,
            'max_over_subscription_ratio': self._mosr,
            'thin_provisioning_support': True,
            'thick_provisioning_support': False,
            'online_extend_support': True,
            'sparse_copy_volume': True,
            'multiattach': False,
            'QoS_support': False,
            'backend_state': 'up' if up else 'down',
        }
