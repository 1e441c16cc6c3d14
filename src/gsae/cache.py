"""The on-disk cache (converted models, cleaned corpora): location, atomic writes, fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TMP_MARK = ".tmp-"
_MIB = 1 << 20


def cache_root() -> Path:
    """The cache folder: `$GSAE_CACHE` if set, else `~/.cache/gsae`."""
    return Path(os.environ.get("GSAE_CACHE") or Path.home() / ".cache" / "gsae").expanduser()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(final: Path) -> None:
    """Delete temporary siblings of `final` left behind by writers that are no longer running."""
    for tmp in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        pid = tmp.name.rsplit(_TMP_MARK, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            _remove(tmp)


@contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write a file or folder into; it becomes `final` only on success.

    The temporary path is a hidden sibling of `final` (same file system), renamed into place when
    the block exits without error, and deleted otherwise, so `final` is never seen half-written.
    If another writer created `final` first, its result is kept and this one is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        if tmp.is_dir():
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            _remove(tmp)


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content hash of a file: sha256 of its size, first MiB and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(_MIB, size - _MIB))
            digest.update(f.read())
    return digest.hexdigest()


def files_fingerprint(root: str | os.PathLike, files: list[Path]) -> str:
    """A content hash of several files under `root`: their relative paths and fingerprints."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_fingerprint(file)}\n".encode())
    return digest.hexdigest()
