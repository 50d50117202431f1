"""Files and folders, the bottom layer (stdlib only): atomic writes, sha256, file modes, the
run-folder layout and its one-writer lock.

Everything the harness writes that another step reads is written here: to a temporary file in the
same folder, then `os.replace`d into place, so a reader (or a rerun after SIGKILL) sees either the
old file or the complete new one, never a prefix that looks complete.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from cocomix.faults import point

CHUNK = 1 << 23  # 8 MiB: hashing reads bounded memory whatever the file size


class FileFormatError(ValueError):
    """A file the project reads is undecodable or unparsable (one line naming it and where)."""


def read_text(path: str | Path) -> str:
    """A UTF-8 text file the project reads; binary garbage is one line naming the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): damaged, "
                              "or not the file it should be") from None


def read_json(path: str | Path) -> Any:
    """The one reader of the project's JSON files: undecodable or unparsable content is one line
    naming the file and where (FileFormatError, a ValueError)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): damaged, "
                              "or not the file it should be") from None


# ---- Filesystem failures: one line naming the file, the errno in words and what is intact ----

FS_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file larger than the process's file-size limit allows, ulimit -f",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) report one


class StorageError(OSError):
    """A write failed for a reason of the filesystem (full, quota, size limit, read-only, no permission)."""

    def __str__(self) -> str:
        return self.strerror


def fs_errno(e: BaseException) -> int | None:
    """The filesystem errno (one of FS_ERRORS) behind `e`, also when a library re-raised it as its own
    error: safetensors' "I/O error: ... (os error 28)", or anything chained from an OSError."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in FS_ERRORS:
            return e.errno
        m = _OS_ERROR_RE.search(str(e)) if not isinstance(e, OSError) else None
        if m and int(m.group(1)) in FS_ERRORS:
            return int(m.group(1))
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def write_failure(e: BaseException, path: str | Path, intact: str, what: str | None = None) -> StorageError | None:
    """`e` as one line when the filesystem caused it (None otherwise): `what` was written (default: the
    file the OS names, else `path`), the errno in words, and `intact`: what the failed write left as it was."""
    code = fs_errno(e)
    if code is None:
        return None
    name = what or getattr(e, "filename", None) or path
    return StorageError(code, f"cannot write {name}: {FS_ERRORS[code]} ({errno.errorcode[code]}); {intact}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file in the same folder, then rename). A write the
    filesystem refuses leaves no temporary file and is one line (StorageError)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)  # open() applies the umask: no chmod needed (unlike safetensors' 0600)
        point(f"write:{path.name}")
        os.replace(tmp, path)
    except OSError as e:
        failure = write_failure(e, path, "its previous version is unchanged" if path.exists() else "nothing was written",
                                what=str(path))
        if failure is None:
            raise
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise failure from None
    return path


class _Recorder:
    """A file for torch.save that keeps the OSError of a failed write: torch's serializer replaces it
    with 'unexpected pos' (no errno, no file name)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, b) -> int:
        try:
            return self.fh.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: str | Path) -> None:
    """torch.save, but a filesystem failure surfaces as the OSError (with the file) that caused it."""
    import torch  # lazy: files is stdlib-only until something is saved with torch

    with open(path, "wb") as fh:
        rec = _Recorder(fh)
        try:
            torch.save(obj, rec)
        except RuntimeError:
            if rec.error is None:
                raise
            rec.error.filename = str(path)
            raise rec.error from None


TMP_RE = re.compile(r"\.tmp(\d+)$")


def clear_stale_tmp(folder: str | Path) -> None:
    """Delete the temporary files that killed writers left in `folder` (`<name>.tmp<pid>` of
    `atomic_write_bytes`, whose pid is no longer alive on this host); live writers' files are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = TMP_RE.search(p.name)
        if m is None or not p.is_file():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # alive under another user / not a pid: leave it
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain `open` would under the
    current umask: libraries that write 0600 (safetensors) would keep colleagues on a shared
    filesystem from reading weights."""
    path, mask = Path(path), _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


class RunInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """A held run-folder lock. Objects in one process that open the same run (a test that builds two
    Trainers, a sweep that re-opens a trial) share it; the flock goes when the last of them closes,
    or when the process dies."""

    _held: dict[str, list] = {}  # resolved run folder -> [open lock file, number of holders]

    def __init__(self, key: str):
        self.key, self.closed = key, False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        entry = RunLock._held[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[self.key]
            entry[0].close()

    __del__ = close  # a Trainer built and never trained frees the folder when it is collected


def lock_run(run_dir: str | Path) -> RunLock:
    """Take the one-writer lock of a run folder (`<run_dir>/.lock`, a `flock` the OS releases when
    the holder exits, SIGKILL included, so nothing is left to clean up). Returns the lock; keep it
    for as long as the run writes, close it to release. Raises RunInUse naming the holder when
    another process has it."""
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in RunLock._held:  # this process already writes here
        RunLock._held[key][1] += 1
        return RunLock(key)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise RunInUse(f"run folder {run_dir} is in use by {holder}; wait for it to finish or stop it") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    fh.flush()
    RunLock._held[key] = [fh, 1]
    return RunLock(key)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs))


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    return update_sha256(hashlib.sha256(), path).hexdigest()


def update_sha256(h, path: str | Path):
    """Feed a file into a running hash (several files into one identity)."""
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h


def file_identity(st: os.stat_result) -> dict[str, int]:
    """What says a file is unchanged since it was hashed (shard and label stamps): size, mtime, ctime
    and inode (the rule of make and rsync, plus ctime and inode; damage below the file system is not seen)."""
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def sha256_matches_once(path: str | Path, sha256: str, stamp: str | Path) -> bool:
    """Whether `path` has this sha256, hashing it only when it changed since its last match: the
    JSON `stamp` remembers {file name: identity and sha256} of files that matched (damaged or
    unwritable stamps only cost a re-hash)."""
    path, stamp = Path(path), Path(stamp)
    try:
        known = read_json(stamp)
        assert isinstance(known, dict)
    except Exception:  # noqa: BLE001 - absent or damaged: hash again
        known = {}
    record = {**file_identity(path.stat()), "sha256": sha256}
    if known.get(path.name) == record:
        return True
    if sha256_file(path) != sha256:
        return False
    if file_identity(path.stat()) == {k: v for k, v in record.items() if k != "sha256"}:
        try:
            atomic_write_json(stamp, {**known, path.name: record}, indent=1)
        except OSError:
            pass
    return True


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (sorted keys)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def write_sealed_json(path: str | Path, obj: dict[str, Any], indent: int | None = 1) -> Path:
    """Atomically write a JSON object that carries its own sha256 (key "sha256", of the rest), so a
    reader can tell the record as written from one damaged afterwards (`read_sealed_json`)."""
    return atomic_write_json(path, {**obj, "sha256": sha256_json(obj)}, indent=indent)


def read_sealed_json(path: str | Path) -> dict[str, Any] | None:
    """The object `write_sealed_json` wrote, or None when the file is damaged (not JSON, not UTF-8,
    or its content no longer matches its sha256)."""
    try:
        obj = read_json(path)
        body = {k: v for k, v in obj.items() if k != "sha256"}
        return obj if obj.get("sha256") == sha256_json(body) else None
    except (ValueError, AttributeError):
        return None
