"""Shares whose NFS client keeps file locks to itself are refused: every host would get every
lease there.  Checked on /proc/self/mounts lines as Linux writes them."""

from snapfs.chain.leases import lock_problem

MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
srv:/export /mnt/ok nfs4 rw,relatime,vers=4.2,rsize=1048576,hard,proto=tcp,local_lock=none 0 0
srv:/export /mnt/flock nfs4 rw,relatime,vers=4.2,local_lock=flock 0 0
srv:/export /mnt/posix nfs rw,relatime,vers=3,local_lock=posix 0 0
srv:/export /mnt/all nfs4 rw,relatime,vers=4.1,local_lock=all 0 0
srv:/export /mnt/nolock nfs rw,relatime,vers=3,nolock,local_lock=all 0 0
srv:/other /mnt/ok/inner\\040dir nfs rw,vers=3,nolock 0 0
"""


def test_server_locks_are_accepted():
    assert lock_problem("/mnt/ok", MOUNTS) is None
    assert lock_problem("/mnt/ok/shares/a", MOUNTS) is None
    assert lock_problem("/mnt/flock", MOUNTS) is None  # flock() only; leases use fcntl
    assert lock_problem("/srv/local-disk", MOUNTS) is None


def test_client_side_locks_are_refused():
    assert "local_lock=posix" in lock_problem("/mnt/posix", MOUNTS)
    assert "local_lock=all" in lock_problem("/mnt/all/x", MOUNTS)
    assert "nolock" in lock_problem("/mnt/nolock", MOUNTS)


def test_the_innermost_mount_decides():
    assert "nolock" in lock_problem("/mnt/ok/inner dir/share", MOUNTS)
    assert lock_problem("/mnt/ok/inner", MOUNTS) is None
