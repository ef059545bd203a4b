"""Requests between the daemons of one share, carried by files on the share: no daemon opens
a network port, and whatever can reach the share can reach every daemon on it.

Each daemon has an inbox, ``.snapfs/hosts/<host>.inbox``: a JSON object of entries
``{id: {"from", "request", "posted", "state", "reply"}}``, read and rewritten only under a
lock (``leases.RecordFile``), so every daemon sees the latest entries even over NFS.  A sender
posts an entry (state ``new``); the owner claims it (``claimed``) before it starts, and answers
it (``done`` with the reply); the sender reads the reply and removes the entry.  A sender that
gives up withdraws its entry, which works only while it is unclaimed: a request is either
carried out and answered, or provably never started.
"""

from __future__ import annotations

import os
import time
import uuid

from snapfs.chain.leases import RecordFile
from snapfs.errors import Corrupt

NEW, CLAIMED, DONE = "new", "claimed", "done"
FORGET_AFTER = 3600.0  # seconds an uncollected answer stays


def inbox_path(meta: str, host: str) -> str:
    return os.path.join(meta, "hosts", f"{host}.inbox")


class Inbox:
    """One daemon's inbox; every call blocks on the share."""

    def __init__(self, meta: str, host: str):
        self.host = host
        self.file = RecordFile(inbox_path(meta, host))

    # -- the sender's side -----------------------------------------------------------------

    def post(self, sender: str, request: dict) -> str:
        rid = uuid.uuid4().hex
        entry = {"from": sender, "request": request, "posted": time.time(), "state": NEW}
        self.file.update(lambda rec: rec.__setitem__(rid, entry))
        return rid

    def entry(self, rid: str) -> dict | None:
        return self.file.read().get(rid)

    def withdraw(self, rid: str) -> bool:
        """Remove an unclaimed entry; False when the owner has already claimed it."""
        def change(rec: dict) -> bool:
            e = rec.get(rid)
            if e is None or e.get("state") == NEW:
                rec.pop(rid, None)
                return True
            return False
        return self.file.update(change)

    def collect(self, rid: str) -> dict | None:
        """The reply of an answered entry, removing the entry; None while unanswered."""
        def change(rec: dict):
            e = rec.get(rid)
            if e is None or e.get("state") != DONE:
                return False
            del rec[rid]
            return e.get("reply") or {}
        reply = self.file.update(change)
        return reply if isinstance(reply, dict) else None

    def forget(self, rid: str) -> None:
        self.file.update(lambda rec: rec.pop(rid, None) and None)

    # -- the owner's side ------------------------------------------------------------------

    def claim(self) -> list[tuple[str, str, dict]]:
        """Claim every new entry: ``[(id, sender, request)]``, to carry out now.  Answers
        nobody collected for an hour (their sender died) are dropped on the way."""
        def change(rec: dict) -> list:
            out = []
            old = time.time() - FORGET_AFTER
            for rid, e in list(rec.items()):
                if not isinstance(e, dict) or (e.get("state") == DONE
                                               and e.get("posted", 0) < old):
                    del rec[rid]
                elif e.get("state") == NEW:
                    e["state"] = CLAIMED
                    out.append((rid, str(e.get("from")), e.get("request")))
            return out
        try:
            if not self._has_new():
                return []
        except Corrupt:
            self.file.update(lambda rec: rec.clear(), fresh=True)  # senders time out
            raise
        return self.file.update(change)

    def _has_new(self) -> bool:
        return any(isinstance(e, dict) and e.get("state") == NEW
                   for e in self.file.read().values())

    def answer(self, rid: str, reply: dict) -> None:
        def change(rec: dict) -> None:
            e = rec.get(rid)
            if isinstance(e, dict):
                e["state"], e["reply"] = DONE, reply
        self.file.update(change)

    def abandon_claimed(self, message: str) -> int:
        """At start: answer what a previous run of this daemon claimed and never answered."""
        def change(rec: dict) -> int:
            n = 0
            for e in rec.values():
                if isinstance(e, dict) and e.get("state") == CLAIMED:
                    e["state"] = DONE
                    e["reply"] = {"ok": False, "errno": "EIO", "message": message}
                    n += 1
            return n
        return self.file.update(change)

    def close(self) -> None:
        self.file.close()
