"""One run at a time holds a build: `_lock.json` at the build's root, local folder or `s3://` prefix.

Acquiring is atomic: locally an `O_CREAT|O_EXCL` create, on S3 a PUT with `If-None-Match: *`. The lock
names its holder (host, pid, process start time, user, command, run id) and carries a lease that a
daemon thread renews every lease/3 (on S3 a PUT with `If-Match` on the lock's ETag, locally a rewrite
after checking that the file is still ours). A renewal that finds the lock gone or someone else's sets
a flag, and `check()` (and leaving the `with` block) raises `LockLost`: a run never carries on silently
after losing its build.

A lock whose holder is gone is taken over: on the same machine (same boot, same PID namespace) when the
holder's process is dead or its PID now belongs to a process started at another time; anywhere when its
lease expired without renewal (measured by the store's own clock: file mtime locally, the server's
`Last-Modified` and `Date` on S3, so clock skew between machines does not matter on S3). Takeover is
atomic too: on S3 a PUT with `If-Match` on the stale lock's ETag; locally takers pass one at a time
through an `O_EXCL` mutex (`_lock.json.takeover`), check that the lock still is the one judged stale
and replace it by rename, so the lock never disappears and a plain create cannot slip in.
Whoever takes over learns whom from (`took_over_from`): that run's half-written outputs are not to be
trusted, which the stage engine's checks of every output take care of.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import random
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import psutil
from fsspec.asyn import sync

from pipeline.errors import one_line, redact
from pipeline.storage import BuildStore

LOCK_NAME = "_lock.json"
DEFAULT_LEASE_SECONDS = 60.0
# An unreadable local lock file younger than this is one being written right now (O_EXCL create, then
# write): wait for it instead of judging it.
_UNREADABLE_GRACE_SECONDS = 2.0
_ATTEMPTS = 50
# A local takeover holds `_lock.json.takeover` for milliseconds; one older than this was abandoned.
_ABANDONED_TAKEOVER_SECONDS = 10.0
# A PID's start time read back from /proc is exact to the clock tick; anything further apart is
# another process that reused the PID.
_START_TIME_TOLERANCE = 0.5
# S3 error codes that mean "the condition did not hold": someone else changed or removed the lock.
_LOST_RACE_CODES = frozenset(
    {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"}
)


class LockError(RuntimeError):
    """The build's lock could not be taken, kept or read."""


class BuildLocked(LockError):
    """Another run holds the build."""


class LockLost(LockError):
    """The lock this run held was taken by another run, or could not be renewed before its lease ran
    out: this run must stop writing."""


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _this_machine() -> str:
    """Where a PID means something: host name, boot time and PID namespace (two containers on one
    kernel, or one host rebooted, are different machines)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{int(psutil.boot_time())}/{namespace}"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers running under an arbitrary uid)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


@dataclass(frozen=True)
class Holder:
    """Who holds a build: what `_lock.json` holds."""

    host: str
    machine: str
    pid: int
    process_started: float
    user: str
    command: str
    argv: str
    run_id: str
    acquired_at: str
    renewed_at: str
    lease_seconds: float
    lease_expires_at: str

    @classmethod
    def of_this_process(
        cls, command: str, lease_seconds: float, host: str | None = None, machine: str | None = None
    ) -> Holder:
        now = time.time()
        return cls(
            host=host or socket.gethostname(),
            machine=machine or _this_machine(),
            pid=os.getpid(),
            process_started=psutil.Process().create_time(),
            user=_user(),
            command=command,
            argv=redact(" ".join(sys.argv)),
            run_id=uuid.uuid4().hex,
            acquired_at=_utc(now),
            renewed_at=_utc(now),
            lease_seconds=lease_seconds,
            lease_expires_at=_utc(now + lease_seconds),
        )

    def renewed(self) -> Holder:
        now = time.time()
        return dataclasses.replace(
            self, renewed_at=_utc(now), lease_expires_at=_utc(now + self.lease_seconds)
        )

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder recorded in a lock file, or None when the file is empty, torn or not ours."""
        try:
            raw = json.loads(data)
            return cls(
                host=str(raw["host"]),
                machine=str(raw["machine"]),
                pid=int(raw["pid"]),
                process_started=float(raw["process_started"]),
                user=str(raw["user"]),
                command=str(raw["command"]),
                argv=str(raw.get("argv", "")),
                run_id=str(raw["run_id"]),
                acquired_at=str(raw["acquired_at"]),
                renewed_at=str(raw["renewed_at"]),
                lease_seconds=float(raw["lease_seconds"]),
                lease_expires_at=str(raw["lease_expires_at"]),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self) -> str:
        return (
            f"`{self.command}` (host {self.host}, pid {self.pid}, user {self.user}) since {self.acquired_at}"
        )


def process_alive(pid: int, started: float) -> bool:
    """True when `pid` is a live process on this machine that started at `started` (a zombie is dead,
    a PID reused by a later process is not the same process)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < _START_TIME_TOLERANCE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's live process
        return True


@dataclass(frozen=True)
class Observed:
    """The lock as read: its holder (None if unreadable), the token of this exact version (ETag or
    inode), and the seconds since it was last written, by the store's clock."""

    holder: Holder | None
    token: Any
    age_seconds: float


class _Backend(Protocol):
    def create(self, body: bytes) -> Any | None: ...
    def read(self) -> Observed | None: ...
    def take_over(self, stale: Observed, body: bytes) -> Any | None: ...
    def renew(self, token: Any, run_id: str, body: bytes) -> Any | None: ...
    def release(self, token: Any, run_id: str) -> None: ...


@dataclass(frozen=True)
class _FileToken:
    device: int
    inode: int


class _LocalLock:
    """`_lock.json` in a local (or network-mounted) folder."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _write_new(self, target: str, body: bytes) -> _FileToken:
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(descriptor, body)
            os.fsync(descriptor)
            status = os.fstat(descriptor)
        finally:
            os.close(descriptor)
        return _FileToken(status.st_dev, status.st_ino)

    def create(self, body: bytes) -> _FileToken | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            return self._write_new(self.path, body)
        except FileExistsError:
            return None

    def _read(self, path: str) -> Observed | None:
        try:
            with open(path, "rb") as handle:
                status = os.fstat(handle.fileno())
                data = handle.read()
        except FileNotFoundError:
            return None
        return Observed(
            Holder.from_bytes(data),
            _FileToken(status.st_dev, status.st_ino),
            max(0.0, time.time() - status.st_mtime),
        )

    def read(self) -> Observed | None:
        return self._read(self.path)

    def take_over(self, stale: Observed, body: bytes) -> _FileToken | None:
        """Replace the stale lock by ours in one rename, so that the lock never disappears (a plain
        create cannot slip in and miss that a holder was taken over from). Takers go one at a time
        through `_lock.json.takeover` (O_EXCL, holding the taker's record); each checks under it
        that the lock still is the one it judged stale."""
        mutex = f"{self.path}.takeover"
        try:
            self._write_new(mutex, body)
        except FileExistsError:
            self._clear_abandoned(mutex)
            return None
        fresh = f"{self.path}.new-{uuid.uuid4().hex}"
        try:
            current = self.read()
            # The holder is compared too: a freed inode number is soon reused.
            if current is None or current.token != stale.token or current.holder != stale.holder:
                return None
            token = self._write_new(fresh, body)
            os.replace(fresh, self.path)
            return token
        finally:
            for leftover in (fresh, mutex):
                try:
                    os.remove(leftover)
                except FileNotFoundError:
                    pass

    def _clear_abandoned(self, mutex: str) -> None:
        """Remove the takeover mutex of a taker that died holding it (a takeover takes milliseconds):
        moved aside under a unique name, and put back if what was moved is not what was judged."""
        seen = self._read(mutex)
        if seen is None:
            return
        taker = seen.holder
        if taker is not None and taker.machine == _this_machine():
            abandoned = not process_alive(taker.pid, taker.process_started)
        else:
            abandoned = seen.age_seconds > _ABANDONED_TAKEOVER_SECONDS
        if not abandoned:
            return
        aside = f"{mutex}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(mutex, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is None or moved.token != seen.token or moved.holder != seen.holder:
            try:
                os.link(aside, mutex)
            except FileExistsError:
                pass
        os.remove(aside)

    def _ours(self, token: _FileToken, run_id: str) -> bool:
        # The lock is replaced by rename, never absent, except when its holder released it or an
        # operator removed it; look again before concluding all the same.
        for _ in range(3):
            current = self.read()
            if current is not None:
                return (
                    current.token == token and current.holder is not None and current.holder.run_id == run_id
                )
            time.sleep(0.05)
        return False

    def renew(self, token: _FileToken, run_id: str, body: bytes) -> _FileToken | None:
        if not self._ours(token, run_id):
            return None
        fresh = f"{self.path}.renew-{uuid.uuid4().hex}"
        try:
            new_token = self._write_new(fresh, body)
            os.replace(fresh, self.path)
        finally:
            if os.path.exists(fresh):
                os.remove(fresh)
        return new_token

    def release(self, token: _FileToken, run_id: str) -> None:
        if self._ours(token, run_id):
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _s3_error_code(exc: BaseException) -> str:
    """The S3 error code behind an exception s3fs translated (ClientError is its cause)."""
    current: BaseException | None = exc
    while current is not None:
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            error = response.get("Error", {})
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        current = current.__cause__
    return ""


def _lost_race(exc: BaseException) -> bool:
    """The condition of a conditional request did not hold (not: no such bucket, no access)."""
    code = _s3_error_code(exc)
    return code in _LOST_RACE_CODES if code else isinstance(exc, FileExistsError)


class _S3Lock:
    """`_lock.json` under an `s3://` prefix, through the build's s3fs file system (aiobotocore)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.bucket, _, self.key = path.partition("/")

    def _put(self, body: bytes, **condition: str) -> str | None:
        """PUT under `condition`; the new ETag, or None when the condition did not hold."""
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **condition)
        except OSError as exc:
            if _lost_race(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return str(response["ETag"])

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> Observed | None:
        async def get() -> tuple[dict[str, Any], bytes]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            body = response["Body"]
            try:
                return response, await body.read()
            finally:
                body.close()

        try:
            response, data = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        server_date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(server_date) if server_date else datetime.now(UTC)
        age = (now - response["LastModified"]).total_seconds()
        return Observed(Holder.from_bytes(data), str(response["ETag"]), max(0.0, age))

    def take_over(self, stale: Observed, body: bytes) -> str | None:
        return self._put(body, IfMatch=str(stale.token))

    def renew(self, token: str, run_id: str, body: bytes) -> str | None:
        new_token = self._put(body, IfMatch=token)
        if new_token is None:
            # A renewal whose answer was lost on the way may have changed the ETag: the lock is still
            # ours if it still holds our run id (a taker writes its own).
            current = self.read()
            if current is not None and current.holder is not None and current.holder.run_id == run_id:
                new_token = self._put(body, IfMatch=str(current.token))
        return new_token

    def release(self, token: str, run_id: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except OSError as exc:
            if _lost_race(exc):
                return  # not ours any more: leave it to its holder
            if _s3_error_code(exc) != "NotImplemented":
                raise
            # A store without conditional deletes: delete when the lock still is this version.
            current = self.read()
            if current is not None and current.token == token:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        finally:
            self.fs.invalidate_cache(self.path)


def _backend_for(store: BuildStore) -> _Backend:
    path = store.path(LOCK_NAME)
    if store.is_local:
        return _LocalLock(path)
    if store.uri.startswith("s3://"):
        return _S3Lock(store.fs, path)
    raise LockError(f"no build lock for {redact(store.uri)}: builds live in a local folder or under s3://")


# The locks this process holds, by build: normally one per build.
_HELD: dict[str, list[BuildLock]] = {}
_HELD_GUARD = threading.Lock()


def check_held(store: BuildStore) -> None:
    """Raise LockLost when this process held the build's lock and lost it (nothing when it holds none):
    for long loops to call before they commit work."""
    with _HELD_GUARD:
        locks = list(_HELD.get(store.uri, ()))
    for lock in locks:
        lock.check()


class BuildLock:
    """`with BuildLock(store, "spectralearth run") as lock:` holds the build for the block's duration.

    `host`/`machine` name where this holder runs; they default to this machine (tests pose as
    another one to exercise lease expiry)."""

    def __init__(
        self,
        store: BuildStore,
        command: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        host: str | None = None,
        machine: str | None = None,
    ) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self.store = store
        self.command = command
        self.lease_seconds = float(lease_seconds)
        # After a takeover: True, and the previous holder (None if its lock file was unreadable).
        self.took_over = False
        self.took_over_from: Holder | None = None
        self._identity = (host, machine)
        self._backend = _backend_for(store)
        self._holder: Holder | None = None
        self._token: Any = None
        self._state = threading.Lock()  # guards _token and _holder between renewer and release
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return redact(self.store.uri_of(LOCK_NAME))

    @property
    def holder(self) -> Holder | None:
        return self._holder

    # Acquire -------------------------------------------------------------------------------------
    def acquire(self) -> BuildLock:
        if self._holder is not None:
            raise LockError(f"this run already holds {self.uri}")
        host, machine = self._identity
        holder = Holder.of_this_process(self.command, self.lease_seconds, host=host, machine=machine)
        try:
            token, displaced = self._acquire(holder)
        except OSError as exc:
            raise LockError(f"cannot take the lock {self.uri}: {one_line(exc)}") from exc
        self._holder, self._token, self._lost = holder, token, None
        self.took_over = displaced is not None
        self.took_over_from = displaced.holder if displaced is not None else None
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"lock-renewer {self.uri}", daemon=True
        )
        self._renewer.start()
        with _HELD_GUARD:
            _HELD.setdefault(self.store.uri, []).append(self)
        return self

    def _acquire(self, holder: Holder) -> tuple[Any, Observed | None]:
        """Our lock's token and the stale lock we took over, if any."""
        body = holder.to_bytes()
        # A stale lock seen on the way and why: when it vanished before we could replace it (removed
        # by hand) and our create then won, we still are the run that follows a dead one.
        displaced: tuple[Observed, str] | None = None
        for _ in range(_ATTEMPTS):
            token = self._backend.create(body)
            if token is not None:
                if displaced is None:
                    return token, None
                self._log_takeover(*displaced)
                return token, displaced[0]
            current = self._backend.read()
            if current is None:
                continue  # released between our create and our read
            reason = self.stale_reason(current)
            if reason is None:
                if current.holder is None and current.age_seconds < _UNREADABLE_GRACE_SECONDS:
                    time.sleep(0.05)  # being written this instant
                    continue
                raise BuildLocked(self._locked_message(current))
            displaced = (current, reason)
            token = self._backend.take_over(current, body)
            if token is not None:
                self._log_takeover(current, reason)
                return token, current
            time.sleep(random.uniform(0.0, 0.05))  # lost the race: look again at what won
        raise BuildLocked(f"build {redact(self.store.uri)} is contended: could not take {self.uri}")

    def stale_reason(self, observed: Observed) -> str | None:
        """Why the observed lock's holder is gone, or None when it may still be running."""
        holder = observed.holder
        if holder is None:
            if observed.age_seconds > max(_UNREADABLE_GRACE_SECONDS, DEFAULT_LEASE_SECONDS):
                return f"its lock file is unreadable and {observed.age_seconds:.0f} s old"
            return None
        if holder.machine == _this_machine():
            if not process_alive(holder.pid, holder.process_started):
                return f"process {holder.pid} on {holder.host} is gone"
            return None
        if observed.age_seconds > holder.lease_seconds:
            return (
                f"its lease of {holder.lease_seconds:g} s was last renewed {observed.age_seconds:.0f} s ago"
            )
        return None

    def _locked_message(self, observed: Observed) -> str:
        build = redact(self.store.uri)
        if observed.holder is None:
            age = observed.age_seconds
            return f"build {build} is locked by an unreadable {self.uri} written {age:.0f} s ago"
        return (
            f"build {build} is in use by {observed.holder.describe()}; "
            f"try again when it has finished (lock: {self.uri})"
        )

    def _log_takeover(self, stale: Observed, reason: str) -> None:
        who = stale.holder.describe() if stale.holder else "an unknown holder"
        print(
            f"spectralearth: took over the lock of build {redact(self.store.uri)} from {who}: {reason}",
            file=sys.stderr,
            flush=True,
        )

    # Keep ----------------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.lease_seconds / 3):
            with self._state:
                if self._holder is None or self._stop.is_set():
                    return
                holder = self._holder.renewed()
                try:
                    token = self._backend.renew(self._token, holder.run_id, holder.to_bytes())
                except Exception as exc:  # a fault of the store: try again until the lease runs out
                    if time.monotonic() - last_renewed >= self.lease_seconds:
                        self._lose(
                            f"could not renew it within its {self.lease_seconds:g} s lease: {one_line(exc)}"
                        )
                        return
                    continue
                if token is None:
                    self._lose(self._taken_by())
                    return
                self._holder, self._token = holder, token
                last_renewed = time.monotonic()

    def _taken_by(self) -> str:
        try:
            current = self._backend.read()
        except Exception:  # only for the message
            current = None
        if current is None:
            return "it was removed"
        if current.holder is None:
            return "it was replaced by an unreadable lock"
        return f"it was taken over by {current.holder.describe()}"

    def _lose(self, why: str) -> None:
        self._lost = (
            f"lost the lock of build {redact(self.store.uri)}: {why}; this run's outputs are not trusted"
        )
        print(f"spectralearth: {self._lost}", file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise LockLost when a renewal found the lock taken or could not renew it in time."""
        if self._lost is not None:
            raise LockLost(self._lost)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    # Release -------------------------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and delete the lock if it still is ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with _HELD_GUARD:
            held = _HELD.get(self.store.uri, [])
            if self in held:
                held.remove(self)
            if not held:
                _HELD.pop(self.store.uri, None)
        with self._state:
            holder, token = self._holder, self._token
            self._holder = self._token = None
        if holder is not None and self._lost is None:
            try:
                self._backend.release(token, holder.run_id)
            except OSError as exc:  # the store failed: the lock lapses with its lease (or our pid)
                print(
                    f"spectralearth: could not remove {self.uri} ({one_line(exc)}); the next run takes it "
                    f"over once this process has ended or its lease of {self.lease_seconds:g} s expired",
                    file=sys.stderr,
                    flush=True,
                )

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.release()
        if exc_type is None:
            self.check()
