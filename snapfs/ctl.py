"""The control-file protocol (CONTRACT.md section 3): request encoding and a client.

A request is one ``write()`` of a JSON object; the reply is read back from offset 0 of the same
descriptor.  Clients that must not wait behind others create their own request file under
``.snapfs/requests/``.  Used by ``snapfs ctl``, the Cinder driver and the tests.
"""

from __future__ import annotations

import errno
import json
import os
import uuid

MAX_REQUEST = 64 * 1024
CONTROL = ".snapfs/control"
REQUESTS = ".snapfs/requests"
STATUS = ".snapfs/status"


class ControlError(Exception):
    """A refused control request: ``errno`` and the daemon's one-line message."""

    def __init__(self, err: int, message: str, reply: dict | None = None):
        super().__init__(f"{errno.errorcode.get(err, err)}: {message}")
        self.errno = err
        self.message = message
        self.reply = reply or {}


def encode(op: str, **args) -> bytes:
    data = json.dumps({"op": op, **args}).encode()
    if len(data) > MAX_REQUEST:
        raise ValueError("request larger than 64 KiB")
    return data


def parse_value(text: str):
    """A ``key=value`` argument from the shell: integers, booleans, else a string."""
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        return text


class Client:
    """One private request file in a snapfs mount; requests on it never queue behind others."""

    def __init__(self, mountpoint: str, name: str | None = None):
        self.path = os.path.join(mountpoint, REQUESTS, name or f"client-{uuid.uuid4().hex}")
        self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)

    def request(self, op: str, **args) -> dict:
        """Run one request; returns its result or raises ControlError."""
        data = encode(op, **args)
        failed = None
        try:
            os.pwrite(self.fd, data, 0)
        except OSError as exc:
            failed = exc
        reply = self._reply()
        if failed is not None:
            msg = reply.get("message") or failed.strerror or str(failed)
            raise ControlError(failed.errno or errno.EIO, msg, reply)
        if not reply.get("ok"):
            raise ControlError(errno.EIO, reply.get("message", "no reply"), reply)
        return reply.get("result", {})

    def _reply(self) -> dict:
        chunks = []
        off = 0
        while True:
            chunk = os.pread(self.fd, 65536, off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        try:
            return json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            return {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
