"""Where test Ray nodes write: every file held open for writing by a node's processes must lie
in that node's own temp dir, and the places Ray, torch and matplotlib write by default must
gain nothing from them.

:class:`WriteWatch` samples ``/proc/<pid>/fd`` of every process of each node's session (its
``ray start``, raylet, workers, job drivers) a few times a second; a file that is opened and
closed between two samples escapes it, which is why :func:`default_places` complements it: a
snapshot of the default locations (``~/.ray``, ``~/ray_results``, the torch and matplotlib
caches, Ray's default ``/tmp/ray`` sessions) taken before and after. Other people's processes
on the machine may write there too, so only what can be told apart is attributed: files in the
real home's Ray, torch and matplotlib folders, and ``/tmp/ray`` sessions named after one of
the nodes' processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from raynodes import RayNode

# Default write locations of Ray, Ray Train, torch and matplotlib, under the real home.
HOME_PLACES = (
    ".ray",
    "ray_results",
    ".cache/torch",
    ".cache/matplotlib",
    ".config/matplotlib",
    ".cache/huggingface",
)
RAY_DEFAULT_TEMP = Path("/tmp/ray")


class WriteWatch:
    """``with WriteWatch(nodes) as watch:`` … ``watch.outside`` maps each file a node's process
    held open for writing outside that node's temp dir to the process's name."""

    def __init__(self, nodes: Sequence[RayNode], interval: float = 0.25) -> None:
        self.nodes = list(nodes)
        self.interval = interval
        self.outside: dict[str, str] = {}
        self.pids: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="write-watch", daemon=True)

    def __enter__(self) -> WriteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                root = str(node.temp_dir.resolve()) + os.sep
                for pid in node.pids():
                    self.pids.add(pid)
                    for path in _written_files(pid):
                        if not path.startswith(root):
                            self.outside.setdefault(path, _name(pid))
            self.samples += 1
            self._stop.wait(self.interval)


def _written_files(pid: int) -> list[str]:
    """Regular files (and shared memory) that process ``pid`` holds open for writing; deleted
    files are left out (nothing of them remains)."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
            if not target.startswith("/") or target.endswith(" (deleted)"):
                continue  # sockets, pipes, anonymous inodes; unlinked files
            if target.startswith(("/proc/", "/sys/")) or (
                target.startswith("/dev/") and not target.startswith("/dev/shm/")
            ):
                continue
            flags = _fd_flags(pid, fd)
        except OSError:
            continue  # closed meanwhile
        if flags & (os.O_WRONLY | os.O_RDWR):
            found.append(target)
    return found


def _fd_flags(pid: int, fd: str) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    return 0


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def default_places(home: Path | None = None) -> dict[str, float]:
    """Every file under the real home's Ray, torch and matplotlib folders, and every session
    folder under Ray's default temp dir, with its modification time."""
    home = home or Path(os.path.expanduser("~"))
    found: dict[str, float] = {}
    for place in HOME_PLACES:
        for dirpath, _, files in os.walk(home / place):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    found[path] = os.stat(path).st_mtime
                except OSError:
                    continue
    try:
        for entry in os.scandir(RAY_DEFAULT_TEMP):
            found[entry.path] = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        pass
    return found


def new_in_default_places(before: dict[str, float], pids: set[int]) -> list[str]:
    """What appeared or changed in :func:`default_places` since ``before`` that the nodes'
    processes (``pids``) made: any file in the home's folders; a ``/tmp/ray`` session only if
    it is named after one of ``pids`` (Ray names sessions ``session_<date>_<time>_<pid>``)."""
    after = default_places()
    changed = [p for p, t in after.items() if before.get(p) != t]
    ours = []
    for path in changed:
        if path.startswith(str(RAY_DEFAULT_TEMP) + os.sep):
            tail = Path(path).name.rsplit("_", 1)[-1]
            if not (tail.isdigit() and int(tail) in pids):
                continue
        ours.append(path)
    return ours
