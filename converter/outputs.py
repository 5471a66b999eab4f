"""Output directories that are complete or absent: write into a temporary sibling, rename when done.

Temporary siblings are named ``.OUT.slimformer-tmp-PID-XXXXXXXX`` (and ``-old-`` for the previous output
while ``--overwrite`` swaps it out), and a temporary directory holds an owner file (pid, process start
time, host) until the rename. A run killed outright (SIGKILL, power loss) cannot clean up, so the next run
that writes into the same directory does: it removes the temporary outputs of slimformer processes that
are no longer running (restoring a swapped-out output whose replacement never arrived), and names those it
must not touch (another user's, another host's). A write that fails because the disk is full or a path is
not writable becomes one :class:`SlimformerError` line. Every writer (checkpoint, ONNX, vLLM) uses this.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SlimformerError

# ---- -------------------------------------------------------------------------------------

OWNER_FILE = ".slimformer-owner.json"
# .OUT.slimformer-KIND-PID-SUFFIX: KIND tmp (being written), old (the replaced output during --overwrite),
# probe (the writability probe); SUFFIX from mkdtemp.
TEMP_NAME = re.compile(r"^\.(?P<out>.+)\.slimformer-(?P<kind>tmp|old|probe)-(?P<pid>\d+)-(?P<suffix>[\w]+)$")
LEGACY_TEMP_NAME = re.compile(
    r"^\.(?P<out>.+)\.(tmp|old)-[\w]+$"
)  # slimformer <= 0.2 (no pid): only reported
_reported: set[str] = set()  # leftovers already mentioned in this process (both check functions scan)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _temp_prefix(out: Path, kind: str) -> str:
    return f".{out.name}.slimformer-{kind}-{os.getpid()}-"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_running(pid: int, owner: dict | None) -> bool | None:
    """Whether the slimformer process that made a temporary output still runs (``None``: cannot tell here)."""
    if owner and owner.get("host") not in (None, socket.gethostname()):
        return None  # another machine's process (a shared file system): its pid means nothing here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = (owner or {}).get("start")
    return not (
        started and _process_start(pid) not in (None, started)
    )  # a different process now has that pid


def clean_stale_outputs(directory: Path, log: Callable[[str], None] = _note) -> None:
    """Remove the temporary outputs in ``directory`` left by slimformer runs that died (killed, power loss),
    if this user owns them; say where the others are. A swapped-out ``-old-`` output whose replacement never
    got renamed into place is restored instead of removed."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return
    for path in entries:
        match = TEMP_NAME.match(path.name)
        if match is None:
            if LEGACY_TEMP_NAME.match(path.name) and path.is_dir() and str(path) not in _reported:
                _reported.add(str(path))
                log(
                    f"warning: {path} looks like a temporary output of an older slimformer; "
                    "remove it if no conversion or export is running"
                )
            continue
        pid, kind = int(match["pid"]), match["kind"]
        if pid == os.getpid():
            continue
        owner = None
        try:
            owner = json.loads((path / OWNER_FILE).read_text()) if kind == "tmp" else None
        except (OSError, ValueError):
            pass  # not yet written, or cut short by the kill: judge by the pid in the name
        running = _owner_running(pid, owner)
        if running:
            continue  # a live run's work in progress
        if running is None or path.lstat().st_uid != os.geteuid():
            if str(path) not in _reported:
                _reported.add(str(path))
                whose = f"host {owner.get('host')}" if running is None else f"uid {path.lstat().st_uid}"
                log(
                    f"warning: stale temporary output {path} (slimformer pid {pid}, {whose}) is not this user's to "
                    "remove; delete it by hand once that run is over"
                )
            continue
        target = directory / match["out"]
        try:
            if kind == "old" and not target.exists():
                os.rename(
                    path, target
                )  # killed between the two renames of --overwrite: put the old output back
                log(
                    f"note: restored {target} from {path.name}, left by slimformer pid {pid} (no longer running)"
                )
                continue
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            log(
                f"note: removed stale temporary output {path} ({size / 1e6:.1f} MB) left by slimformer pid {pid}, "
                "which is no longer running"
            )
        except OSError as exc:
            if str(path) not in _reported:
                _reported.add(str(path))
                log(
                    f"warning: cannot remove stale temporary output {path} ({exc.strerror}); delete it by hand"
                )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_location(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out`` cannot become the output directory; clean up beside it.

    Missing parent directories are fine (:func:`atomic_output_dir` creates them); the nearest existing one
    must be a writable directory.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SlimformerError(
            "output path is an existing file", where=str(out), fix="choose a directory path for -o"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimformerError(
            "output directory already exists and is not empty",
            where=str(out),
            fix="choose a new path or pass --overwrite",
        )
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise SlimformerError(
            "a parent of the output path is an existing file",
            where=str(base),
            fix="choose an output path whose parents are directories",
        )
    try:  # a real probe: os.access() says yes to root even on read-only file systems
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(out, "probe"), dir=base))
    except OSError as exc:
        raise SlimformerError(
            f"output location is not writable ({exc.strerror})",
            where=str(base),
            fix="choose a writable directory for -o",
        ) from exc
    if base == out.parent:
        clean_stale_outputs(base)
    return out


def write_failure(exc: BaseException, out: Path) -> SlimformerError | None:
    """The one-line error for a write that failed for a reason outside slimformer -- a full disk, a quota, a
    read-only file system, a permission -- or ``None`` when ``exc`` is something else. Looks through the
    exception's causes and reads errno codes out of messages too: safetensors and torch report I/O errors as
    text (``I/O error: No space left on device (os error 28)``)."""
    code, filename = None, None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            code, filename = current.errno, current.filename
            break
        text = str(current)
        found = re.search(r"(?:\[Errno |Os \{ code: |os error )(\d+)", text)
        if found:
            code = int(found.group(1))
            break
        for message, value in (
            ("No space left on device", errno.ENOSPC),
            ("Disk quota exceeded", errno.EDQUOT),
            ("Read-only file system", errno.EROFS),
            ("Permission denied", errno.EACCES),
        ):
            if message in text:
                code = value
                break
        if code is not None:
            break
        current = current.__cause__ or current.__context__
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = {
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "the disk quota is exhausted",
            errno.EFBIG: "a file is larger than the file system allows",
        }[code]
        return SlimformerError(
            f"cannot write the output {out}: {reason}",
            where=str(_existing_ancestor(out.parent)),
            fix=f"free space there (`df -h {_existing_ancestor(out.parent)}`) or write elsewhere "
            "with -o; nothing was left behind",
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "the file system is read-only" if code == errno.EROFS else "permission denied"
        if filename and not Path(os.path.abspath(filename)).is_relative_to(out.parent):
            # Not the output: an input that cannot be read (a tokenizer file, a shard) while writing it.
            return SlimformerError(
                f"cannot read {filename}: {reason}",
                where=str(filename),
                fix="make the file readable (chmod u+r), or run as a user who may read it",
            )
        return SlimformerError(
            f"cannot write the output {out}: {reason}",
            where=str(_existing_ancestor(out.parent)),
            fix="choose a writable location for -o (or fix the permissions)",
        )
    return None


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    Missing parents of ``out`` are created (and removed again if the output is not written). On failure the
    temporary directory goes; a full disk or a permission problem becomes a :class:`SlimformerError`.
    """
    out = check_output_location(out, overwrite=overwrite)
    created = []  # parents this call makes, outermost first
    for parent in reversed(out.parents):
        if not parent.exists():
            created.append(parent)
    tmp = backup = None
    try:
        for parent in created:
            parent.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
        # Who is writing, so a later run can tell a dead run's leftovers from a live run's work.
        owner = {
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "output": str(out),
        }
        (tmp / OWNER_FILE).write_text(json.dumps(owner) + "\n")
        yield tmp
        (tmp / OWNER_FILE).unlink(missing_ok=True)
        _apply_umask(tmp)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
            os.rename(out, backup)  # replaces the empty directory mkdtemp made
        os.rename(tmp, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException as exc:
        if backup is not None and backup.exists() and not out.exists():
            os.rename(backup, out)  # the new output never arrived: the old one goes back exactly as it was
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (someone else wrote there), or already gone: leave it
        problem = (
            write_failure(exc, out)
            if isinstance(exc, Exception) and not isinstance(exc, SlimformerError)
            else None
        )
        if problem is not None:
            raise problem from exc
        raise


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the finished output the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
