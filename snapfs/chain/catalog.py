"""What is on the share: volume files, upstream Cinder's ``.info`` files and snapfs's own records.

Layout (CONTRACT.md section 1): ``volume-<vid>`` is a volume's base, ``volume-<vid>.<sid>`` the
overlay created when snapshot ``<sid>`` was taken, ``volume-<vid>.info`` upstream's JSON.
snapfs keeps its own records under ``.snapfs/`` on the share:

- ``.snapfs/volumes/<vid>.json``  base format (recorded once, never guessed again), snapshot
  creation times, the owner and mode the mount shows;
- ``.snapfs/intents/<vid>.json``  the multi-step operation in progress, if any;
- ``.snapfs/tmp/<host>/``          temporary files, renamed into place when complete (one
  directory per host id: a daemon starting never removes another's files in progress);
- ``.snapfs/hosts/``, ``owners/``, ``generation``  leases and change counters
  (``snapfs.chain.leases``).

Every file is replaced atomically: write a temporary file, fsync, rename, fsync the directory.
This module does blocking calls on the share; callers run them through ``snapfs.io``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from snapfs.chain.format import MAGIC
from snapfs.errors import Corrupt, Invalid, SnapfsError, from_oserror

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9_-]+")
PREFIX = "volume-"
META_DIR = ".snapfs"


def check_id(value, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value) or len(value) > 200:
        raise Invalid(f"{what} must match [A-Za-z0-9_-]+")
    if what in ("volume", "source_volume") and value.startswith(PREFIX):
        raise Invalid(f"{what} is a bare id, without the '{PREFIX}' prefix")
    return value


def base_name(vid: str) -> str:
    return PREFIX + vid


def overlay_name(vid: str, sid: str) -> str:
    return f"{PREFIX}{vid}.{sid}"


def is_chain_name(vid: str, name: str) -> bool:
    """``volume-<vid>`` or ``volume-<vid>.<id>``: the only names a volume's chain may use."""
    b = base_name(vid)
    return name == b or (name.startswith(b + ".") and bool(ID_RE.fullmatch(name[len(b) + 1:])))


def info_name(vid: str) -> str:
    return f"{PREFIX}{vid}.info"


class Share:
    """Blocking access to one share directory: names, ``.info`` files and records."""

    def __init__(self, root: str, *, file_mode: int = 0o660, unrecorded_format: str | None = None,
                 host: str = "local"):
        self.root = os.path.abspath(root)
        self.file_mode = file_mode
        self.unrecorded_format = unrecorded_format
        self.meta = os.path.join(self.root, META_DIR)
        self.tmp = os.path.join(self.meta, "tmp", host)
        for d in ("", "volumes", "intents", "tmp", self.tmp):
            os.makedirs(os.path.join(self.meta, d), mode=0o700, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # -- atomic files ----------------------------------------------------------------------

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = os.path.join(self.tmp, f"{os.path.basename(path)}.{uuid.uuid4().hex}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
            try:
                os.fchmod(fd, self.file_mode)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            self.sync_dir(os.path.dirname(path))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise from_oserror(exc, f"writing {os.path.basename(path)}") from None

    def sync_dir(self, d: str | None = None) -> None:
        fd = os.open(d or self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        """Rename share file ``src`` over ``dst`` durably (one atomic step on the share)."""
        try:
            os.rename(self.path(src), self.path(dst))
        except OSError as exc:
            raise from_oserror(exc, f"renaming {src} to {dst}") from None
        self.sync_dir()

    def remove(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise from_oserror(exc, f"removing {name}") from None

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path(name))

    # -- upstream's .info ------------------------------------------------------------------

    def read_info(self, vid: str) -> dict | None:
        p = self.path(info_name(vid))
        try:
            with open(p, "rb") as f:
                raw = f.read(1 << 20)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_oserror(exc, f"reading {info_name(vid)}") from None
        try:
            info = json.loads(raw)
        except ValueError:
            raise Corrupt(f"{info_name(vid)} is not valid JSON") from None
        if not isinstance(info, dict) or not isinstance(info.get("active"), str):
            raise Corrupt(f"{info_name(vid)} has no active file")
        for k, v in info.items():
            if not isinstance(v, str) or (k != "active" and not ID_RE.fullmatch(k)):
                raise Corrupt(f"{info_name(vid)} has an invalid entry {k!r}")
            if not is_chain_name(vid, v):
                raise Corrupt(f"{info_name(vid)} names a file outside the volume: {v!r}")
        return info

    def write_info(self, vid: str, info: dict) -> None:
        """Upstream's format exactly: ``json.dump(info, f, indent=1, sort_keys=True)``."""
        data = json.dumps(info, indent=1, sort_keys=True).encode()
        self.write_atomic(self.path(info_name(vid)), data)

    # -- snapfs's records ------------------------------------------------------------------

    def _record_path(self, vid: str) -> str:
        return os.path.join(self.meta, "volumes", f"{vid}.json")

    def read_record(self, vid: str) -> dict | None:
        try:
            with open(self._record_path(vid), "rb") as f:
                rec = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Corrupt(f"snapfs record of volume {vid} is unreadable: {exc}") from None
        if not isinstance(rec, dict) or rec.get("format") not in ("raw", "qcow2"):
            raise Corrupt(f"snapfs record of volume {vid} is invalid")
        rec.setdefault("snapshots", {})
        return rec

    def write_record(self, vid: str, rec: dict) -> None:
        self.write_atomic(self._record_path(vid), json.dumps(rec, sort_keys=True).encode())

    def record_ids(self) -> list[str]:
        d = os.path.join(self.meta, "volumes")
        return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json"))

    def remove_record(self, vid: str) -> None:
        try:
            os.unlink(self._record_path(vid))
        except FileNotFoundError:
            pass

    def base_format(self, vid: str, overlay_says: str | None) -> str:
        """The base file's format: recorded, or named by an overlay, or classified ONCE now."""
        rec = self.read_record(vid)
        if rec is not None:
            return rec["format"]
        if overlay_says in ("raw", "qcow2"):
            fmt = overlay_says
        elif self.unrecorded_format:
            fmt = self.unrecorded_format
        else:
            fmt = self._classify(base_name(vid))
        log.info("adopting volume %s: base format %s, recorded", vid, fmt)
        self.write_record(vid, {"format": fmt, "snapshots": {}, "adopted": time.time()})
        return fmt

    def _classify(self, name: str) -> str:
        try:
            with open(self.path(name), "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise from_oserror(exc, f"reading {name}") from None
        return "qcow2" if head == MAGIC else "raw"

    # -- intents ---------------------------------------------------------------------------

    def _intent_path(self, vid: str) -> str:
        return os.path.join(self.meta, "intents", f"{vid}.json")

    def write_intent(self, vid: str, intent: dict) -> None:
        self.write_atomic(self._intent_path(vid), json.dumps(intent, sort_keys=True).encode())

    def read_intent(self, vid: str) -> dict | None:
        try:
            with open(self._intent_path(vid), "rb") as f:
                return json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Corrupt(f"intent record of volume {vid} is unreadable: {exc}") from None

    def clear_intent(self, vid: str) -> None:
        try:
            os.unlink(self._intent_path(vid))
            self.sync_dir(os.path.dirname(self._intent_path(vid)))
        except FileNotFoundError:
            pass

    def intents(self) -> list[str]:
        d = os.path.join(self.meta, "intents")
        return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json"))

    def clean_tmp(self) -> None:
        """Drop this host's temporary files (and loose ones an older snapfs left)."""
        for d in (self.tmp, os.path.join(self.meta, "tmp")):
            for n in os.listdir(d):
                p = os.path.join(d, n)
                if os.path.isfile(p):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass

    # -- listing ---------------------------------------------------------------------------

    def listdir(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except OSError as exc:
            raise from_oserror(exc, "listing the share") from None

    def volume_ids(self) -> list[str]:
        out = []
        for n in self.listdir():
            if n.startswith(PREFIX) and "." not in n:
                vid = n[len(PREFIX):]
                if ID_RE.fullmatch(vid):
                    out.append(vid)
        return out

    def volume_files(self, vid: str) -> list[str]:
        """Every file on the share that belongs to a volume (chain, .info, leftovers)."""
        b = base_name(vid)
        return [n for n in self.listdir() if n == b or n.startswith(b + ".")]


def describe_error(exc: BaseException) -> str:
    return exc.message if isinstance(exc, SnapfsError) else f"{type(exc).__name__}: {exc}"
