"""Files on disk: atomic writes, JSON, tensors, folder identity, the cache folder, fingerprints.

Every file gsae writes goes through `atomic_output` (directly or via `write_json` and
`save_tensors`): it appears complete or not at all, with the mode the user's umask gives a new
file (safetensors alone would leave weights readable by their owner only).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gsae.errors import GsaeError

_TMP_MARK = ".tmp-"
_MIB = 1 << 20


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
    permissions.
    """
    final = Path(final)
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


def check_output_file(path: str | os.PathLike, flag: str, schema: str = "gsae.") -> None:
    """Refuse, before any work is done, an output file path that cannot be written (a folder,
    a path under a file, a folder without write permission) or that holds a file gsae did not
    write: an existing file is replaced only if it is a JSON result whose "schema" starts with
    `schema`."""
    path = Path(path)
    if path.is_dir():
        raise GsaeError(f"{flag} {path} is a folder: give a file name")
    if path.is_file() and not _holds_schema(path, schema):
        raise GsaeError(f"{flag} {path} exists and is not a {schema}* result that gsae wrote: "
                        "choose another file name or remove it")
    parent = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise GsaeError(f"{flag} {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GsaeError(f"{flag} {path}: the folder {parent} is not writable")


def _holds_schema(path: Path, schema: str) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith(schema)


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
