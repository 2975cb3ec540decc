"""Which version every worker of one service answers with.

Under gunicorn each worker holds its own model and watches the model base on
its own. Were each to switch as soon as it alone had loaded a new version, a
client whose requests land on different workers would be answered by
version N+1 and then by N again. So the workers agree through a folder of
small files (`SERVE_STATE_DIR`: gunicorn's master makes one per run; a
process on its own keeps a private one):

- `worker-<pid>.json`, one per worker: the versions it holds loaded and the
  one its own checks would serve (its target). A worker writes it before it
  loads anything, so a worker still loading holds every switch back.
- `active.json`: the version the service answers with, and how many switches
  came before it. It moves only when every live worker holds the same
  target, by one atomic replace; every model call reads it (a `stat`, the
  file read again only when it changed). After any answer from the new
  version, no worker answers from the old one.

Rolling back (the served version withdrawn, or a pin) is a switch like any
other. Nothing here imports TensorFlow: the master, which must not, reads it too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ACTIVE = "active.json"


@dataclass(frozen=True)
class Active:
    version: int
    switches: int  # how many switches led here: 1 for the first version served


class Rollout:
    def __init__(self, state_dir: str | None):
        self._own = state_dir is None
        self.dir = Path(state_dir or tempfile.mkdtemp(prefix="cifar-serve-state-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._me = worker_file(self.dir, os.getpid())
        self._seen: tuple[tuple[int, int] | None, Active | None] = (None, None)
        self.publish(holds=[], target=None)

    def active(self) -> Active | None:
        try:
            stat = os.stat(self.dir / ACTIVE)
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns)  # a replace makes a new inode
        if key != self._seen[0]:
            data = json.loads((self.dir / ACTIVE).read_text())
            self._seen = (key, Active(data["version"], data["switches"]))
        return self._seen[1]

    def publish(self, holds, target: int | None) -> None:
        _write(self._me, {"holds": sorted(holds), "target": target})

    def try_switch(self) -> tuple[Active | None, Active] | None:
        """Make the target every live worker holds active; return (before, after)
        when this call switched, None when there was nothing to switch to yet."""
        with open(self.dir / ".lock", "w") as lock:
            # One switch at a time: two workers seeing the same agreement count it once.
            fcntl.flock(lock, fcntl.LOCK_EX)
            targets = set()
            for state in live_workers(self.dir).values():
                if state["target"] is None or state["target"] not in state["holds"]:
                    return None
                targets.add(state["target"])
            before = self.active()
            if len(targets) != 1 or (before and before.version in targets):
                return None
            after = Active(targets.pop(), before.switches + 1 if before else 1)
            _write(self.dir / ACTIVE, {"version": after.version, "switches": after.switches})
            return before, self.active()

    def first_to_tell(self, event: str) -> bool:
        """True for the one worker that reports `event` (a refused version, say),
        so the service logs and counts it once, not once per worker."""
        try:
            os.close(os.open(self.dir / f"told-{event}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def leave(self) -> None:
        if self._own:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self._me.unlink(missing_ok=True)


def worker_file(state_dir: Path, pid: int) -> Path:
    return Path(state_dir) / f"worker-{pid}.json"


def live_workers(state_dir: Path) -> dict[int, dict]:
    """pid -> state of each registered worker that is still running."""
    found = {}
    for path in Path(state_dir).glob("worker-*.json"):
        pid = int(path.stem.removeprefix("worker-"))
        try:
            os.kill(pid, 0)
            found[pid] = json.loads(path.read_text())
        except (ProcessLookupError, PermissionError):  # died before the master removed its file
            continue
        except FileNotFoundError:  # removed as it was read
            continue
    return found


def _write(path: Path, data: dict) -> None:
    """Replace `path` whole: a reader sees the old contents or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
