
import pytest

from tests import qemu


def pytest_configure(config):
    # The oracle must be there: a missing qemu-img fails the run instead of skipping tests.
    qemu.require()


@pytest.fixture
def share(tmp_path):
    """A directory standing in for the share (a local-disk share: inline I/O)."""
    d = tmp_path / "share"
    d.mkdir()
    return d
