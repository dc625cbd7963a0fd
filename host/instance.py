"""One `localmoe up` per home: its lock, its children tied to it, its ports checked first.

- `InstanceLock`: an exclusive fcntl lock on <home>/run/up.lock, held for the life of `up`. The
  kernel drops it when the process ends, however it ends, so a crash leaves no stale lock and a
  second `up` on the same home (the same Redis data, the same queues) is refused at once. The file
  says who holds it (`Holder`: pid, URLs): the refusal message, `localmoe status` and `localmoe
  down` read it. The lock, not the file's content, is the truth.
- `die_with_parent(sig)`: a Popen preexec_fn; PR_SET_PDEATHSIG makes the kernel send `sig` to a
  child when `up` dies, SIGKILL included, where a process group would leave it running.
- `taken(ports)`: which of the ports `up` is about to bind are taken, and by what where this
  user may know; checked before anything starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pydantic import BaseModel

PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # <linux/prctl.h>


class Holder(BaseModel):
    """What the lock file says about the `up` holding it."""

    pid: int
    api_url: str
    flower_url: str
    home: str
    instance: str  # the token its API processes answer /readyz with (X-LocalMoE-Instance)


def lock_path(home: Path) -> Path:
    return home / "run" / "up.lock"


class InstanceLock:
    """`lock.acquire()` → None once this process holds home's lock, else the Holder of the `up`
    that holds it (pid 0 while that one has not written it yet)."""

    def __init__(self, home: Path) -> None:
        self.path = lock_path(home)
        self._file: IO[str] | None = None

    def acquire(self) -> Holder | None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the process
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            unknown = Holder(
                pid=0, api_url="?", flower_url="?", home=str(self.path.parent.parent), instance=""
            )
            return read_holder(self.path.parent.parent) or unknown
        os.set_inheritable(f.fileno(), False)  # children must not keep the lock after `up` is gone
        self._file = f
        return None

    def publish(self, holder: Holder) -> None:
        """Write who holds the lock (after acquire)."""
        assert self._file is not None, "acquire() first"
        self._file.seek(0)
        self._file.truncate()
        self._file.write(holder.model_dump_json())
        self._file.flush()

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.seek(0)
                self._file.truncate()
            self._file.close()  # closing drops the lock
            self._file = None


def held(home: Path) -> bool:
    """Whether an `up` holds home's lock now."""
    path = lock_path(home)
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def read_holder(home: Path) -> Holder | None:
    """The running `up`'s Holder, or None when no `up` holds home's lock."""
    if not held(home):
        return None
    try:
        return Holder.model_validate_json(lock_path(home).read_text())
    except (OSError, ValueError):
        return None  # held, but not yet written (an `up` starting this very moment)


def die_with_parent(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the process that started it dies."""
    parent = os.getpid()
    return lambda: arm_parent_death_signal(parent, sig)


def arm_parent_death_signal(parent: int, sig: int) -> None:
    """In a child of `parent`: the kernel sends it `sig` when the parent's thread that started it
    ends (start children from a thread that lives as long as the parent: its main thread).
    Checks the parent after arming: a parent that died in between would never send it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def set_process_name(name: str) -> None:
    """The name `ps -o comm`, top and psutil's name() show (15 bytes at most; spawned children
    of one Python otherwise all read "python")."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def taken(ports: dict[str, tuple[str, int]]) -> list[str]:
    """ports: the setting that names it → (host, port). → one line per port that cannot be bound
    (what holds it, where psutil can tell), naming the setting to change."""
    out = []
    named: dict[int, str] = {}
    for setting, (host, port) in ports.items():
        if port == 0:
            continue
        if port in named:
            out.append(f"port {port} is named by both {named[port]} and {setting}: give each its own")
            continue
        named[port] = setting
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # No SO_REUSEPORT: a port held by any listener, even one that shares it (an API
            # process left from an earlier start), counts as taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                continue
            except OSError:
                pass
        out.append(f"port {port} ({setting}) is taken{_by(port)}: set {setting} to a free port, or stop it")
    return out


def _by(port: int) -> str:
    """ " by pid N (its command line)" for the process listening on TCP `port`, where /proc tells
    this user (its own processes; every one for root); "" elsewhere."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()  # sl local_address rem_address st ... inode
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids():
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(fd) in inodes:
                    return f" by pid {pid} ({' '.join(cmdline(pid))[:120]})"
    return ""


def pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> list[str]:
    """A process's argv from /proc ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc/N/stat: the fourth field, after the name in
    parentheses, which may itself hold spaces)."""
    out = []
    for child in pids():
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(child)
    return out
