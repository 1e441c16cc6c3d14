"""Files on disk: atomic writes, JSON, tensors, folder identity, the cache folder, fingerprints.

Every file gsae writes goes through `atomic_output` (directly or via `write_json` and
`save_tensors`): it appears complete or not at all, with the mode the user's umask gives a new
file (safetensors alone would leave weights readable by their owner only).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gsae.errors import GsaeError

_TMP_MARK = ".tmp-"
_MIB = 1 << 20
LOCK_FILE = ".gsae.lock"


def cache_root() -> Path:
    """The cache folder: `$GSAE_CACHE` if set, else `~/.cache/gsae`."""
    return Path(os.environ.get("GSAE_CACHE") or Path.home() / ".cache" / "gsae").expanduser()


# ---------------------------------------------------------------------------- atomic writes


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


def current_umask() -> int:
    """The process's umask: from /proc on Linux (no change to the process), else by setting it
    and putting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the mode a plain new file or folder
    gets under the umask: some writers (safetensors, tempfile) create files as 0600."""
    mask = current_umask()
    paths = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        base = 0o777 if p.is_dir() or os.stat(p).st_mode & stat.S_IXUSR else 0o666
        os.chmod(p, base & ~mask)


@contextmanager
def atomic_output(final: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write a file or folder into; it becomes `final` only on success.

    The temporary path is a hidden sibling of `final` (same file system), renamed into place when
    the block exits without error, and deleted otherwise, so `final` is never seen half-written.
    An existing file `final` is replaced. An existing folder `final` is kept (another writer
    made it first) and this one discarded, unless `replace`: then the old folder is renamed
    away, the new one renamed in, and the old one deleted. The result gets the umask's
    permissions. A `final` that is a symbolic link is written where the link points (the link
    stays): renamed onto the link itself, a folder would fail and a file would replace the link.
    """
    final = Path(os.path.realpath(final)) if Path(final).is_symlink() else Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp}")
        _apply_umask(tmp)
        if tmp.is_dir():
            _rename_folder(tmp, final, replace)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            _remove(tmp)


def _rename_folder(tmp: Path, final: Path, replace: bool) -> None:
    if replace and final.is_dir() and any(final.iterdir()):
        old = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        _remove(old)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (no NaN or infinity: they are not JSON) atomically; return the path."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def check_output_file(path: str | os.PathLike, flag: str, schema: str = "gsae.",
                      overwrite: bool | None = None, schema_key: tuple[str, ...] = ("schema",)
                      ) -> None:
    """Refuse, before any work is done, an output file path that cannot be written (a folder,
    a path under a file, a folder without write permission) or that holds a file gsae did not
    write: an existing file is replaced only if it is a JSON result whose "schema" (the string
    at the keys `schema_key`) starts with `schema`, or if `overwrite` (the command's
    --overwrite; None where it has none)."""
    path = Path(path)
    if path.is_dir():
        raise GsaeError(f"{flag} {path} is a folder: give a file name")
    if path.is_file() and not overwrite and not _holds_schema(path, schema, schema_key):
        way = "pass --overwrite to replace it" if overwrite is False else "remove it"
        raise GsaeError(f"{flag} {path} exists and is not a {schema}* result that gsae wrote: "
                        f"choose another {flag} or {way}")
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise GsaeError(f"{flag} {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GsaeError(f"{flag} {path}: the folder {parent} is not writable")


def _holds_schema(path: Path, schema: str, key: tuple[str, ...] = ("schema",)) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    for name in key:
        data = data.get(name) if isinstance(data, dict) else None
    return isinstance(data, str) and data.startswith(schema)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON in `path`, which holds `what` (e.g. "the SAE's config"); a missing, truncated or
    malformed file raises a one-line GsaeError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GsaeError(f"{path} is missing: it should hold {what}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GsaeError(f"{path} cannot be read ({type(err).__name__}): it should hold "
                        f"{what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise GsaeError(f"{path} is truncated or not valid JSON ({err.msg} at line "
                        f"{err.lineno}): it should hold {what}") from None


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write torch tensors as one safetensors file, atomically and with the umask's mode."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_output(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=metadata)
        except SafetensorError as err:  # it reports a failed write (a full disk) as its own type
            raise os_error_of(err, path) from None
    return path


def os_error_of(err: Exception, path: Path) -> OSError:
    """The OSError that a library's error message reports as "os error N" (else EIO)."""
    found = re.search(r"os error (\d+)", str(err))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


# ------------------------------------------------------------------------ folder identity


def claim_folder(folder: str | os.PathLike, identity_file: str, identity: dict[str, Any],
                 what: str, overwrite: bool = False) -> Path:
    """Make `folder` hold `what` (e.g. "an activation store") with this `identity`, refusing to
    mix it with something else.

    If `folder/identity_file` exists and records a different identity, or the folder holds other
    files but no identity file, a one-line GsaeError names the folder and `--overwrite`. With
    `overwrite`, or when the folder is new or empty, the identity is written. A folder whose
    identity file matches is left as it is (the caller continues it). Returns the identity file.
    """
    folder = Path(folder)
    file = folder / identity_file
    if not overwrite:
        _refuse_other(folder, file, _comparable(identity), what)
        if file.is_file():
            return file
    folder.mkdir(parents=True, exist_ok=True)
    return write_json(file, identity)


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(identity))


def _refuse_other(folder: Path, file: Path, identity: dict[str, Any], what: str) -> None:
    if file.is_file():
        recorded = read_json(file, f"the identity of {what}")
        if recorded != identity:
            keys = differing_keys(recorded, identity)
            raise GsaeError(f"{folder} holds {what} made with other settings (differs in: "
                            f"{', '.join(keys)}; see {file}): choose another folder, or pass "
                            "--overwrite to replace it")
    elif folder.is_dir() and any(p.name != file.name for p in folder.iterdir()):
        raise GsaeError(f"{folder} is not empty but does not hold {what}: choose another "
                        "folder, or pass --overwrite to write into it anyway")


def holds_folder(folder: str | os.PathLike, inner: str | os.PathLike) -> bool:
    """Whether the existing folder `inner` is `folder` or lies inside it, by resolved path
    (so replacing `folder` would remove it)."""
    if not Path(inner).is_dir():
        return False
    target, inner = Path(folder).resolve(), Path(inner).resolve()
    return target == inner or target in inner.parents


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON-like dicts differ (the whole value if not dicts)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [] if a == b else [prefix or "(the whole record)"]
    keys: list[str] = []
    for key in sorted(set(a) | set(b), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in a or key not in b:
            keys.append(name)
        else:
            keys.extend(differing_keys(a[key], b[key], name))
    return keys


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (which holds `what`, e.g. "the run") while the block
    runs: `fcntl.flock` on the hidden file LOCK_FILE in it, which records its holder. A second
    holder is refused with one line naming the first (pid, host, start time). The lock ends with
    the block or the process; the file stays (deleting it could split a later lock in two)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise GsaeError(f"{folder} is in use: {what} there is held by {holder}; wait for "
                            "that command to finish (or stop it) and try again") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}".encode(), 0)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------- records


def versions() -> dict[str, str]:
    """The versions of gsae and of what its results depend on, for result files."""
    import torch
    import transformers

    from gsae.version import __version__

    found = {"gsae": __version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
    return found


def file_fingerprint(path: str | os.PathLike, whole: bool = False) -> str:
    """A content hash of a file: sha256 of its size and bytes. With `whole` every byte counts
    (corpora: a change anywhere is seen); without, only the first and last MiB (cheap, for
    model weights of many GB). The two agree for files of at most 2 MiB."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > 2 * _MIB and not whole:
            f.seek(size - _MIB)
        while block := f.read(_MIB):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(root: str | os.PathLike, files: list[Path], whole: bool = False) -> str:
    """A content hash of several files under `root`: their relative paths and fingerprints."""
    digest = hashlib.sha256()
    for file in sorted(files):
        name = file.relative_to(root).as_posix()
        digest.update(f"{name}\0{file_fingerprint(file, whole)}\n".encode())
    return digest.hexdigest()
