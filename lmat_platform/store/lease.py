"""The writer lease of an object-store store: one writer at a time on ``s3://`` (spec section 11).

A local store serializes its writers with an fcntl lock, which the OS drops when a writer dies.
An object store has no such lock, so lmat keeps one object, ``STORE/_lease``, and changes it
only with the conditional writes S3 gives (the same ones delta-rs 1.6 commits with)::

    acquire   PUT _lease  If-None-Match: *      (no lease yet)
              PUT _lease  If-Match: <etag seen>  (the lease seen is released or expired)
    renew     PUT _lease  If-Match: <own etag>   every duration/3, by a heartbeat thread
    release   PUT _lease  If-Match: <own etag>   with ``released: true``

Whoever's conditional PUT lands holds the lease; every other taker gets 412 and waits. Only one
of two takers of one expired lease can win, as both name the same ETag.

A lease expires when its object has not been rewritten for its ``duration_s``. Its age is the
server's clock against the server's clock (the response's ``Date`` minus the object's
``Last-Modified``, plus one second for their whole-second resolution), so writers' clocks do not
matter. A writer killed with SIGKILL stops renewing; the next writer takes over once the lease is
that old. A holder that cannot renew before its lease would expire (a network partition, a
process stopped for longer than the lease) has lost it: :func:`check_lease`, which every table
open for a commit makes, and the end of ``Store.write_lock`` then raise, and the writer stops
rather than reporting success.

Release overwrites the lease with a released one rather than deleting it: conditional DELETE is
newer than conditional PUT on S3-compatible servers (moto 5.1.10 ignores ``If-Match`` on DELETE),
and a stale holder's DELETE without a condition could remove a successor's lease.

Settings: ``LMAT_LEASE_SECONDS`` (default 30) is how long a lease lives without renewal, and so
how long a killed writer blocks the store. The S3 endpoint and credentials come from the standard
``AWS_*`` variables, as for delta-rs. Object stores other than S3-compatible ones have no lease:
writing to them is refused.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from lmat_platform.exceptions import ConcurrencyError, LmatError

log = logging.getLogger(__name__)

LEASE_FILE = "_lease"
#: Environment variable: seconds a lease lives without renewal (a float).
ENV_LEASE_SECONDS = "LMAT_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 30.0
#: ``Date`` and ``Last-Modified`` have whole-second resolution: a lease counts as expired only
#: this much after its duration.
_CLOCK_SLACK_S = 1.0
_S3_SCHEMES = ("s3", "s3a")


def lease_seconds(value: float | None = None) -> float:
    """The lease duration: ``value``, else ``LMAT_LEASE_SECONDS``, else 30 s."""
    if value is None:
        raw = os.environ.get(ENV_LEASE_SECONDS)
        if not raw:
            return DEFAULT_LEASE_SECONDS
        try:
            value = float(raw)
        except ValueError:
            raise LmatError(f"{ENV_LEASE_SECONDS}={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise LmatError(f"{ENV_LEASE_SECONDS}: the lease duration must be > 0 s, but got {value}")
    return float(value)


@dataclass(frozen=True)
class LeaseInfo:
    """What the lease object holds: who holds it, since when, and for how long."""

    owner: str
    """A token unique to one acquisition (host, pid and a random part)."""
    command: str
    """The holder's command line, shortened (for error messages)."""
    acquired_at_us: int
    renewed_at_us: int
    duration_s: float
    seq: int
    """Renewal counter: every write of the lease has different bytes, so a new ETag."""
    released: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseInfo | None:
        try:
            d = json.loads(data.decode())
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"{self.owner} ({self.command})"


@dataclass(frozen=True)
class _Seen:
    """One read of the lease object."""

    info: LeaseInfo | None  # None: the object holds something else (damaged)
    etag: str
    age_s: float  # by the server's clock


def _command_line() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return " ".join([prog, *sys.argv[1:3]])[:120]


def _s3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise LmatError(
            "writers of s3:// stores need boto3 for the store's lease: pip install boto3"
        ) from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    config = Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=15,
    )
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


#: The leases this process holds, by store root: what :func:`check_lease` looks at.
_HELD: dict[str, StoreLease] = {}


def check_lease(root: str) -> None:
    """Raise :class:`ConcurrencyError` if this process holds the lease of store ``root`` and has
    lost it; a no-op otherwise. :meth:`Store.open_table` calls it, so a writer that lost its lease
    (stopped, partitioned) stops at its next table open, which every commit path makes just before
    it commits."""
    lease = _HELD.get(root.rstrip("/"))
    if lease is not None:
        lease.check()


def create_if_absent(root: str, name: str, data: bytes) -> bool:
    """Create object ``name`` under the ``s3://`` store ``root`` unless it exists (one
    ``If-None-Match: *`` PUT): True if this call created it; of concurrent callers, one is."""
    return _LeaseObject(root, name).put_bytes(data, if_match=None) is not None


class _LeaseObject:
    """The lease object (or another object of the store) on S3, and conditional writes of it."""

    def __init__(self, root: str, name: str = LEASE_FILE):
        scheme, _, rest = root.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme.lower() not in _S3_SCHEMES or not bucket:
            raise LmatError(
                f"{root}: writing needs a store lease, which lmat has for s3:// stores only"
            )
        self.uri = f"{root.rstrip('/')}/{name}"
        self.bucket = bucket
        self.key = f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name
        self.client = _s3_client()

    def _error(self, what: str, e: Exception) -> LmatError:
        code, status = self._code(e)
        why = f"{code} (HTTP {status})" if code else str(e)
        return LmatError(f"{self.uri}: could not {what} it: {why}")

    @staticmethod
    def _code(e: Exception) -> tuple[str, int]:
        resp = getattr(e, "response", None) or {}
        return (
            str(resp.get("Error", {}).get("Code", "")),
            int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0),
        )

    def read(self) -> _Seen | None:
        """The lease as it is now; None if there is none."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            code, status = self._code(e)
            if code != "NoSuchBucket" and (status == 404 or code in ("NoSuchKey", "NotFound")):
                return None
            raise self._error("read", e) from e
        except BotoCoreError as e:
            raise self._error("read", e) from e
        body = r["Body"].read()
        modified: _dt.datetime = r["LastModified"]
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date) if date else None
        if now is None or now.tzinfo is None:  # no server clock: fall back to ours
            now = _dt.datetime.now(_dt.UTC)
        return _Seen(LeaseInfo.from_bytes(body), r["ETag"], (now - modified).total_seconds())

    def put(self, info: LeaseInfo, *, if_match: str | None) -> str | None:
        """Write ``info`` if the lease is absent (``if_match`` None) or still has ETag
        ``if_match``; its new ETag, or None when the condition failed."""
        return self.put_bytes(info.to_bytes(), if_match=if_match)

    def put_bytes(self, data: bytes, *, if_match: str | None) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        cond = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        try:
            r = self.client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=data,
                ContentType="application/json",
                **cond,
            )
        except ClientError as e:
            code, status = self._code(e)
            # 412: the condition failed; 409: a concurrent conditional write is in flight
            # (S3 answers ConditionalRequestConflict); 404: If-Match on a lease gone since.
            if code != "NoSuchBucket" and (status in (404, 409, 412) or code in (
                "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"
            )):
                return None
            raise self._error("write", e) from e
        except BotoCoreError as e:
            raise self._error("write", e) from e
        return str(r["ETag"])


class StoreLease:
    """The writer lease of one object-store store, held by this process while in use.

    ``with StoreLease("s3://bucket/store"):`` waits (up to ``timeout_s``) until no other writer
    holds the store, holds it (renewing it in the background) and releases it at the end.
    """

    def __init__(
        self,
        root: str,
        *,
        duration_s: float | None = None,
        timeout_s: float = 600.0,
    ):
        self.root = root.rstrip("/")
        self.duration_s = lease_seconds(duration_s)
        self.timeout_s = float(timeout_s)
        self._obj = _LeaseObject(self.root)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._command = _command_line()
        self._lock = threading.Lock()
        self._info: LeaseInfo | None = None
        self._etag: str | None = None
        self._valid_until = 0.0  # monotonic: no other writer can hold the lease before this
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public
    def acquire(self) -> None:
        """Take the lease, waiting while another writer holds it; :class:`ConcurrencyError`
        naming the store and the holder after ``timeout_s``."""
        if self._etag is not None:
            raise ConcurrencyError(f"{self.root}: this lease is already held by {self._owner}")
        deadline = time.monotonic() + self.timeout_s
        delay = 0.05
        holder: _Seen | None = None
        while True:
            seen = self._obj.read()
            if seen is None:
                if self._put(None):
                    return
            elif seen.info is not None and seen.info.owner == self._owner and not seen.info.released:
                # Our own PUT landed but its answer was lost (the client retried into a 412).
                self._adopt(seen)
                return
            elif self._expired(seen):
                if seen.info is not None and not seen.info.released:
                    log.warning(
                        "%s: taking over the store lease of %s, not renewed for %.1fs",
                        self.root, seen.info.describe(), seen.age_s,
                    )
                if self._put(seen.etag):
                    return
            else:
                holder = seen
                if delay == 0.05:
                    log.info("%s: waiting for the store lease held by %s", self.root,
                             seen.info.describe() if seen.info else "?")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConcurrencyError(self._busy_message(holder))
            time.sleep(min(left, delay * random.uniform(0.5, 1.0)))
            delay = min(delay * 1.6, 1.0)

    def release(self) -> None:
        """Stop renewing and mark the lease released (a no-op if it was lost)."""
        self._stop.set()
        if _HELD.get(self.root) is self:
            del _HELD[self.root]
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._etag is None or self._info is None:
                return
            info, etag = self._info, self._etag
            self._etag = None
            if self._lost is not None:
                return
            done = LeaseInfo(**{**asdict(info), "seq": info.seq + 1, "released": True,
                                "renewed_at_us": time.time_ns() // 1000})
            try:
                if self._obj.put(done, if_match=etag) is None:
                    log.warning("%s: the store lease was taken over before its release", self.root)
            except Exception as e:  # noqa: BLE001 - an unreleased lease only expires later
                log.warning("%s: could not release the store lease (%s); it expires in %.0fs",
                            self.root, e, self.duration_s)

    def check(self) -> None:
        """Raise :class:`ConcurrencyError` if this process no longer holds the lease (it was
        taken over, or could not be renewed in time): its writer must not go on."""
        if self._lost is None and self._etag is not None and time.monotonic() >= self._valid_until:
            self._lost = f"not renewed within its {self.duration_s:g}s"
        if self._lost is not None:
            raise ConcurrencyError(
                f"{self.root}: this writer lost the store lease ({self._lost}); another writer "
                "may have written since: re-run the command"
            )

    def __enter__(self) -> StoreLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---------------------------------------------------------------- inside
    def _expired(self, seen: _Seen) -> bool:
        if seen.info is not None and seen.info.released:
            return True
        duration = seen.info.duration_s if seen.info is not None else self.duration_s
        return seen.age_s > duration + _CLOCK_SLACK_S

    def _busy_message(self, holder: _Seen | None) -> str:
        if holder is None or holder.info is None:
            who = "another writer"
        else:
            who = f"writer {holder.info.describe()}"
        return (
            f"{self.root}: {who} held the store lease for all of {self.timeout_s:g}s "
            f"(lease object {self._obj.uri}, renewed {holder.age_s if holder else 0:.0f}s ago)"
        )

    def _put(self, etag: str | None) -> bool:
        now = time.time_ns() // 1000
        info = LeaseInfo(self._owner, self._command, now, now, self.duration_s, 0)
        t0 = time.monotonic()
        new = self._obj.put(info, if_match=etag)
        if new is None:
            return False
        self._won(info, new, t0)
        return True

    def _adopt(self, seen: _Seen) -> None:
        assert seen.info is not None
        # Its write started before this read: the read's age bounds how long it has run.
        self._won(seen.info, seen.etag, time.monotonic() - seen.age_s - _CLOCK_SLACK_S)

    def _won(self, info: LeaseInfo, etag: str, t0: float) -> None:
        with self._lock:
            self._info, self._etag, self._lost = info, etag, None
            self._valid_until = t0 + info.duration_s
        _HELD[self.root] = self
        log.info("%s: holding the store lease as %s", self.root, self._owner)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"lmat-lease-{self._owner}", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.duration_s / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                self._renew()
                wait = interval
            except Exception as e:  # noqa: BLE001 - retried until the lease would expire
                if time.monotonic() >= self._valid_until:
                    self._lost = f"could not renew it: {e}"
                    log.error("%s: lost the store lease: %s", self.root, self._lost)
                    return
                wait = min(interval, max(0.05, (self._valid_until - time.monotonic()) / 4))
                log.warning("%s: renewing the store lease failed (%s); retrying in %.1fs",
                            self.root, e, wait)
            if self._lost is not None:
                return

    def _renew(self) -> None:
        with self._lock:
            if self._etag is None or self._info is None or self._stop.is_set():
                return
            info = LeaseInfo(**{**asdict(self._info), "seq": self._info.seq + 1,
                                "renewed_at_us": time.time_ns() // 1000})
            t0 = time.monotonic()
            new = self._obj.put(info, if_match=self._etag)
            if new is None:
                seen = self._obj.read()
                if seen is not None and seen.info == info:  # ours landed; its answer was lost
                    new = seen.etag
                else:
                    by = seen.info.describe() if seen is not None and seen.info else "?"
                    self._lost = f"taken over by {by}"
                    log.error("%s: lost the store lease: %s", self.root, self._lost)
                    return
            self._info, self._etag = info, new
            self._valid_until = t0 + info.duration_s
