"""A run lock in `job.output_dir`, so that two runs never write one folder's checkpoints and metrics.

The lock is a small JSON file `run.lock` (pid, host, start time, a random token) created atomically
(O_EXCL) by rank 0 of a run, kept fresh by a heartbeat thread (its mtime and `heartbeat` field are
rewritten every HEARTBEAT_S seconds) and deleted at the end of the run. A run that finds the lock
held is refused with an `OutputDirLockedError` naming the folder and the holder. A lock is stale,
and is taken over with a warning, when its process is dead on this host (or is this process, left
by an earlier run in it), when it was left by an earlier attempt of this torchrun job (same
TORCHELASTIC_RUN_ID, lower TORCHELASTIC_RESTART_COUNT: after `--max-restarts` the new rank 0 may be
on another host), when it is held by a rank 0 of this torchrun job on another host whose heartbeat
stops for two beats (a node lost and replaced under another hostname), or when its heartbeat is
older than `stale_after_s` (a holder on another host that died, or a pid reused since). Taking over replaces the file atomically and then reads it back, so
of two runs taking over one stale lock at once, the one whose file is not there is refused.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mpo_dist.distributed import raise_on_every_rank
from mpo_dist.errors import InputError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: the holder is gone (or hung past any use)

_held_tokens: set[str] = set()  # the locks this process holds now (to tell them from ones an earlier run left)


class OutputDirLockedError(InputError):
    """Another live run holds job.output_dir."""


class RunLock:
    def __init__(self, folder: str | Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 log: Callable[[str], None] = print):
        self.folder, self.path = Path(folder), Path(folder) / LOCK_NAME
        self.stale_after_s, self.heartbeat_s, self.log = stale_after_s, heartbeat_s, log
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> None:
        """Take the lock or raise OutputDirLockedError; a stale lock is taken over with a warning."""
        self.folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": token, **_job()}
        if not self._create(record):
            holder = self._read()
            reason = self._stale_reason(holder)
            if reason is None and self._same_job_elsewhere(holder):
                reason = self._silent_for_two_beats(holder)
                holder = self._read()
            if reason is None:
                raise OutputDirLockedError(self._held_message(holder))
            self.log(f"mpo_dist: WARNING: taking over the run lock {self.path} ({reason})")
            self._write(record)
            if (self._read() or {}).get("token") != token:  # another run took it over at the same moment
                raise OutputDirLockedError(self._held_message(self._read()))
        self.token = token
        _held_tokens.add(token)
        atexit.register(self.release)  # a run that fails before Trainer.close still gives it back
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="mpo_dist-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (idempotent)."""
        if self.token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        _held_tokens.discard(self.token)
        self.token = None
        atexit.unregister(self.release)

    # ------------------------------------------------------------------ the file

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump({**record, "heartbeat": record["started"]}, handle)
        return True

    def _write(self, record: dict[str, Any]) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{record['token']}.tmp")
        tmp.write_text(json.dumps({**record, "heartbeat": time.time()}))
        os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any] | None:
        """The lock's record with `age` (seconds since its last heartbeat) added; None when absent."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError(text)
        except ValueError:
            record = {}  # cut by a crash while written: only its age says something
        beat = record.get("heartbeat")
        newest = max(mtime, beat) if isinstance(beat, (int, float)) else mtime
        return {**record, "age": max(0.0, time.time() - newest)}

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                self.log(f"mpo_dist: WARNING: the run lock {self.path} was removed or taken over by another run")
                return
            try:
                self._write({key: value for key, value in holder.items() if key not in ("age", "heartbeat")})
            except OSError:
                pass  # a full or flaky disk: the next beat tries again

    # ------------------------------------------------------------------ deciding

    def _stale_reason(self, holder: dict[str, Any] | None) -> str | None:
        if holder is None:
            return "it was just released"
        if holder["age"] > self.stale_after_s:
            return f"no heartbeat for {holder['age']:.0f} s"
        job, theirs = _job(), (holder.get("run_id"), holder.get("attempt"))
        if job["run_id"] and theirs[0] == job["run_id"] and isinstance(theirs[1], int) and theirs[1] < job["attempt"]:
            return f"left by attempt {theirs[1]} of this torchrun job {job['run_id']}, now attempt {job['attempt']}"
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or host is None:
            return "it is unreadable" if holder["age"] > 2 * self.heartbeat_s else None
        if host != socket.gethostname():
            return None
        if pid == os.getpid():
            return None if holder.get("token") in _held_tokens else "left by an earlier run in this process"
        if not _alive(pid):
            return f"its process {pid} on {host} is dead"
        return None

    def _same_job_elsewhere(self, holder: dict[str, Any] | None) -> bool:
        """The holder is a rank 0 of this same torchrun job on another host. Its nodes were lost and came
        back (a node started anew under another hostname gets rank 0): torchrun runs one round of a
        job at a time, so a holder that still beats is a second job reusing the id, and one that is
        silent is gone. Its restart count cannot tell: each node's agent counts its own."""
        run_id = _job()["run_id"]
        return bool(run_id) and holder is not None and holder.get("run_id") == run_id \
            and holder.get("host") != socket.gethostname()

    def _silent_for_two_beats(self, holder: dict[str, Any]) -> str | None:
        """Wait until the holder's heartbeat moves (None: alive) or two beats pass without one (the reason)."""
        # A full 2.5 beats from now, whatever the holder's age says: the age compares another host's
        # clock with ours, and a holder may just be slow to write (its own checkpoint on a busy disk).
        deadline = time.monotonic() + 2.5 * self.heartbeat_s
        seen = holder.get("heartbeat")
        self.log(f"mpo_dist: the run lock {self.path} is held by {holder.get('host')}, a rank 0 of this torchrun "
                 f"job {holder.get('run_id')}; waiting up to {2.5 * self.heartbeat_s:.0f} s for its heartbeat")
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.heartbeat_s / 10))
            current = self._read()
            if current is None:
                return "it was just released"
            if current.get("heartbeat") != seen:
                return None
        return (f"left by this torchrun job {holder.get('run_id')} on {holder.get('host')}, "
                f"no heartbeat for {2.5 * self.heartbeat_s:.0f} s")

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        holder = holder or {}
        started = holder.get("started")
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else ""
        return (f"job.output_dir {self.folder} is in use by another run: {self.path} is held by pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}{since} (last heartbeat "
                f"{holder.get('age', 0):.0f} s ago); wait for that run to end or stop it, or use another "
                f"job.output_dir (a lock whose process is dead, or with no heartbeat for {self.stale_after_s:.0f} s, "
                "is taken over)")


def _job() -> dict[str, Any]:
    """This process's torchrun job and attempt (restarts under --max-restarts count up), if any."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "attempt": int(attempt) if attempt.isdigit() else 0}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def folders_to_create(folder: str | Path) -> list[Path]:
    """The folders that creating `folder` would make, deepest first (none when it exists)."""
    missing, path = [], Path(folder).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) that are empty: what a refused run created, nothing it did not."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:  # not empty, or already gone
            return


def take_run_lock(folder: str | Path, is_main: bool, log: Callable[[str], None] = print) -> RunLock | None:
    """Rank 0 takes `folder`'s run lock; every rank learns the outcome (a collective), so a refused run
    ends with an input error on every rank. Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(folder, log=log)
            lock.acquire()
        except Exception as caught:  # refused, or the folder cannot be written
            error = caught
    raise_on_every_rank(error, lambda: OutputDirLockedError(
        f"job.output_dir {folder}: rank 0 could not take the run lock (see its error)"))
    return lock
