"""oslo.config options of the snapfs Cinder driver.

Registered in ``[backend_defaults]`` like every in-tree driver's options, so that each backend
section of cinder.conf may set them (``volume_driver = cinder_driver.driver.SnapfsDriver``).
"""

from oslo_config import cfg

from cinder.volume import configuration

snapfs_opts = [
    cfg.StrOpt('snapfs_shares_config',
               default='/etc/cinder/snapfs_shares',
               help='File with the list of shares snapfs serves, one a line, as in '
                    'nfs_shares_config: "host:/export [NFS mount flags]" for an NFS '
                    'export, or an absolute local path for a directory that is already '
                    'there (a local disk, or an export mounted by the system).'),
    cfg.StrOpt('snapfs_mount_point_base',
               default='$state_path/mnt-snapfs',
               help='Directory holding the snapfs mounts (<base>/<md5 of the share>) '
                    'and, under <base>/.shares/, the NFS mounts of the exports beneath '
                    'them. Nova reaches volumes through these paths: use the same '
                    'directory on every compute host, mounted there with "snapfs '
                    'attach-mounts".'),
    cfg.StrOpt('snapfs_mount_options',
               default='allow_other',
               help='Options for mount.snapfs (-o), comma separated. allow_other lets '
                    'QEMU (running as its own user) open the volume files.'),
    cfg.StrOpt('snapfs_nfs_mount_options',
               help='Mount options for the NFS exports beneath snapfs (see nfs(5)), '
                    'as nfs_mount_options.'),
    cfg.BoolOpt('snapfs_qcow2_volumes',
                default=False,
                help='Give new volumes a qcow2 base file on the share instead of a '
                     'sparse raw one (the seed spec\'s nfs_qcow2_volumes). Guests and '
                     'Cinder see raw files either way.'),
    cfg.BoolOpt('snapfs_secure_file_operations',
                default=False,
                help='Run Cinder\'s data commands (qemu-img, dd) as the cinder-volume '
                     'user instead of root: the mounts then show volume files owned by '
                     'that user (uid=/gid= mount options, mode 0660).'),
    cfg.StrOpt('snapfs_ctl_group',
               help='Group allowed to use the snapfs control files besides root '
                    '(ctl_gid= mount option). Default: the group of the cinder-volume '
                    'process when it does not run as root.'),
    cfg.StrOpt('snapfs_mount_helper',
               default='/sbin/mount.snapfs',
               help='Path of the mount.snapfs helper (make install puts it in /sbin; '
                    'scripts/mount.snapfs in a checkout). Run through the root helper: '
                    'see cinder_driver/snapfs.filters.'),
    cfg.IntOpt('snapfs_control_timeout',
               default=3600,
               min=1,
               help='Seconds to wait for one snapfs control request (a clone or a '
                    'revert of a large volume takes long) before failing the operation.'),
]

CONF = cfg.CONF
CONF.register_opts(snapfs_opts, group=configuration.SHARED_CONF_GROUP)


def list_opts():
    """For oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [(configuration.SHARED_CONF_GROUP, snapfs_opts)]
