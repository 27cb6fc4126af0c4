"""One run per output folder: a lock file created with O_EXCL, holding the owner's pid and host.

A second ``forgetless run`` on the same folder refuses with a clear message while the first is
alive. A lock left by a killed run (its pid is gone on this host) is taken over, so a killed run
can always be resumed by running the same command again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from forgetless.errors import InputError

LOCK_NAME = ".forgetless.lock"
#: written into every run folder forgetless creates; only such folders are written into
MARKER_NAME = ".forgetless-run"


def claim_run_folder(folder: str | os.PathLike) -> Path:
    """Make ``folder`` a run folder, or refuse: forgetless writes only into a folder it created.

    A missing or empty folder is created and marked; a marked folder (or one laid out by an
    earlier forgetless version: ``config.json`` beside ``base/`` or ``methods/``) is resumed;
    anything else (a file, a folder of other files) is refused before anything is written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder; give a new or empty folder for the run")
    marker = folder / MARKER_NAME
    if folder.is_dir() and not marker.exists():
        ours = (folder / "config.json").is_file() and any(
            (folder / name).exists() for name in ("base", "methods", LOCK_NAME)
        )
        if any(folder.iterdir()) and not ours:
            raise InputError(
                f"--out {folder} holds files that forgetless did not write (no {MARKER_NAME}); give a new or "
                "empty folder, so that nothing in it is overwritten"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "forgetless run"}) + "\n", encoding="utf-8")
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``folder`` for the duration of the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            same_host = owner.get("host") == me["host"]
            if owner and same_host and not _alive(int(owner.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its run was killed
                continue
            who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
            raise InputError(
                f"{folder} is in use by another forgetless run ({who}); wait for it to finish, "
                f"or use another --out folder (delete {path} only if that run is really gone)"
            ) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield path
    finally:
        if _read(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
