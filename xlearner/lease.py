"""One writer per output: a stage holds a lease on its output prefix while it writes.

The lease of ``<out>`` is the sibling ``<out>.lease`` (outside the prefix, so it is never
listed, fetched or hashed as an output) and records its owner: host, pid, run id, since
when. A second stage on the same prefix waits up to ``wait_s`` for it, then fails with
:class:`LeaseHeld`, naming the owner.

- Local store: an exclusive ``fcntl.flock`` on that file. The OS drops it when the owner
  dies, however it dies, so a local lease never outlives its writer (and needs no
  heartbeat). It holds across processes on one host and on file systems that implement
  flock (not every NFS).
- S3: an object created with a conditional PUT (``If-None-Match: *``, which S3 and
  SeaweedFS honour), renewed every ``ttl_s / 3`` by a heartbeat thread that rewrites it
  with ``If-Match`` on its own ETag. A lease whose heartbeat is older than its owner's
  ``ttl_s``, or whose owner was a process of this host that is gone, is an owner that
  died: it is deleted (``If-Match`` its ETag, so only that one) and taken.
  A writer whose heartbeat finds the lease gone or another's logs it and marks the lease
  ``lost``. This relies on the hosts' clocks agreeing within ``ttl_s``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xlearner.store import LocalStore, S3Store, StoreError, resolve

log = logging.getLogger("xlearner.lease")

LEASE_SUFFIX = ".lease"
DEFAULT_WAIT_S = 30.0
DEFAULT_TTL_S = 60.0
POLL_S = 1.0


@dataclass
class Owner:
    """Who holds a lease: enough to find the process and the run."""

    host: str
    pid: int
    run: str | None
    ttl_s: float = DEFAULT_TTL_S  # expired when its heartbeat is older (S3 leases)
    since: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def here(cls, run: str | None, ttl_s: float = DEFAULT_TTL_S) -> Owner:
        return cls(socket.gethostname(), os.getpid(), run, ttl_s)

    def expired(self) -> bool:
        return time.time() - self.heartbeat > self.ttl_s

    def gone(self) -> bool:
        """An owner on this host whose process is no more: its lease is free already."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):  # empty (being written or released) or foreign
            return None

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (
            f"pid {self.pid} on {self.host} (run {self.run or 'unknown'}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}, "
            f"alive {age:.0f} s ago)"
        )


class LeaseHeld(StoreError):
    """Another live stage holds the lease of this output."""

    def __init__(self, uri: str, owner: Owner | None, waited_s: float):
        self.uri, self.owner = uri, owner
        who = owner.describe() if owner else "another stage"
        super().__init__(
            f"{uri} is being written by {who}; waited {waited_s:.0f} s. Wait for it to "
            "finish (its result is then reused) or stop it"
        )


class _LocalLease:
    def __init__(self, path: Path, owner: Owner):
        self.path, self.owner = path, owner
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.owner.dump(), 0)
        self.fd = fd
        return True

    def holder(self) -> Owner | None:
        try:
            return Owner.parse(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # the file stays: unlinking a flock'ed file races
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _S3Lease:
    def __init__(self, store: S3Store, key: str, owner: Owner):
        self.client, self.bucket = store.client, store.bucket
        self.key = store._key(key)
        self.owner = owner
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _code(self, err: Exception) -> str:
        return getattr(err, "response", {}).get("Error", {}).get("Code", "")

    def _put(self, **condition: str) -> None:
        self.owner.heartbeat = time.time()
        answer = self.client.put_object(
            Bucket=self.bucket, Key=self.key, Body=self.owner.dump(), **condition
        )
        self.etag = answer["ETag"]

    def _read(self) -> tuple[Owner | None, str | None]:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if self._code(err) in {"NoSuchKey", "404"}:
                return None, None
            raise
        return Owner.parse(got["Body"].read()), got["ETag"]

    def try_acquire(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._put(IfNoneMatch="*")
        except ClientError as err:
            if self._code(err) not in {"PreconditionFailed", "ConditionalRequestConflict"}:
                raise
            holder, etag = self._read()
            if etag and (holder is None or holder.expired() or holder.gone()):
                log.warning(
                    f"s3://{self.bucket}/{self.key}: taking over the lease of the dead "
                    f"{holder.describe() if holder else 'an unreadable owner'}"
                )
                try:  # only that lease: a renewed or a new one has another ETag
                    self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
                except ClientError as gone:
                    if self._code(gone) not in {"PreconditionFailed", "NoSuchKey", "404"}:
                        raise
            return False
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(self.owner.ttl_s / 3):
            try:
                self._put(IfMatch=self.etag or "")
            except ClientError as err:
                if self._code(err) in {"PreconditionFailed", "NoSuchKey", "404"}:
                    self.lost = True
                    log.error(f"s3://{self.bucket}/{self.key}: lease lost to another writer")
                    return
                log.warning(f"s3://{self.bucket}/{self.key}: lease heartbeat failed: {err}")
            except BotoCoreError as err:  # unreachable for now: the next beat may pass
                log.warning(f"s3://{self.bucket}/{self.key}: lease heartbeat failed: {err}")

    def holder(self) -> Owner | None:
        return self._read()[0]

    def release(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag and not self.lost:
            try:  # If-Match: never another writer's lease
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except (ClientError, BotoCoreError) as err:  # it expires on its own
                log.warning(f"s3://{self.bucket}/{self.key}: lease not released: {err}")


def lease_uri(out_uri: str) -> str:
    return out_uri.rstrip("/") + LEASE_SUFFIX


@contextmanager
def output_lease(
    out_uri: str,
    endpoint_url: str | None = None,
    *,
    run: str | None = None,
    wait_s: float = DEFAULT_WAIT_S,
    ttl_s: float = DEFAULT_TTL_S,
) -> Iterator[Any]:
    """Hold the lease of the output ``out_uri`` inside; :class:`LeaseHeld` after ``wait_s``."""
    parent, name = resolve(out_uri.rstrip("/"), endpoint_url)
    owner = Owner.here(run, ttl_s)
    lease: _LocalLease | _S3Lease
    if isinstance(parent, LocalStore):
        lease = _LocalLease(parent.root / (name + LEASE_SUFFIX), owner)
    elif isinstance(parent, S3Store):
        lease = _S3Lease(parent, name + LEASE_SUFFIX, owner)
    else:  # pragma: no cover - open_store knows no other kind
        raise StoreError(f"{out_uri}: no lease for a {type(parent).__name__}")
    started = time.monotonic()
    waiting_logged = False
    while not lease.try_acquire():
        waited = time.monotonic() - started
        if waited >= wait_s:
            raise LeaseHeld(out_uri, lease.holder(), waited)
        if not waiting_logged:
            holder = lease.holder()
            log.info(
                f"{out_uri}: waiting up to {wait_s:.0f} s for "
                f"{holder.describe() if holder else 'another writer'}"
            )
            waiting_logged = True
        time.sleep(min(POLL_S, max(0.0, wait_s - waited)))
    try:
        yield lease
    finally:
        lease.release()
