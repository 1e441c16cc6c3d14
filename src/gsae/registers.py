"""Registers: texts unlike the encyclopedic prose the SAEs train on, read offline from files that
Python or Debian packages install, each named by a short corpus name (`--unseen code`).

Every register is a list of documents split at the text's natural boundaries (a module, a
licence, a fortune cookie) and cleaned by the rules of its loader. Its documents come in the
order of the SHA-256 of their text, so that the first tokens of a register (which is what the
study evaluates) sample the whole of it rather than its first file. docs/registers.md gives each
register's source, licence and size.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gsae.errors import GsaeError
from gsae.io import files_fingerprint

CLEANING_VERSION = 1
FORTUNES = Path("/usr/share/games/fortunes")
LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Register:
    """A named text: where its files are, how each file becomes documents, and its licence."""

    name: str
    description: str
    licence: str
    package: str  # what installs its files: "python" or a Debian package name
    files: Callable[[], list[Path]]
    documents: Callable[[str], list[str]]


# Cleaning rules -----------------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"^\s+--\s?\S.*$")
_COOKIE_END = re.compile(r"^%[ \t]*$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def tidy_lines(text: str) -> str:
    """Unix line ends, no trailing spaces on a line, at most one blank line in a row, no blank
    lines at either end."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def fortune_cookies(text: str) -> list[str]:
    """The cookies of a fortune file (separated by lines holding only `%`): overstruck
    characters (`x<BS>y`, printed as y over x) keep only the character printed last, and
    attribution lines (indented, starting with `--`) are dropped, as are cookies left empty."""
    cookies = []
    for cookie in _COOKIE_END.split(_OVERSTRIKE.sub("", text)):
        kept = [line for line in cookie.split("\n") if not _ATTRIBUTION.match(line)]
        if (cleaned := tidy_lines("\n".join(kept))).strip():
            cookies.append(cleaned)
    return cookies


def code_module(text: str) -> list[str]:
    """A source file as one document, its lines tidied (empty files dropped)."""
    cleaned = tidy_lines(text)
    return [cleaned] if cleaned.strip() else []


def licence_text(text: str) -> list[str]:
    """A licence as one document: form feeds (page breaks in the GNU texts) removed, lines
    tidied."""
    cleaned = tidy_lines(text.replace("\f", ""))
    return [cleaned] if cleaned.strip() else []


# Where the files are ------------------------------------------------------------------------------


def _stdlib_modules() -> list[Path]:
    """The top-level modules of Python's standard library (no packages, no tests)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _licences() -> list[Path]:
    """Debian's common licences, each text once (GPL is a link to GPL-3, and so on)."""
    return sorted({p.resolve() for p in LICENSES.iterdir() if p.is_file()}
                  if LICENSES.is_dir() else [])


def _fortune_files(subfolder: str, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()
                   ) -> Callable[[], list[Path]]:
    """The fortune files of a folder under FORTUNES (not their .dat indexes nor .u8 links),
    `only` those if given, without `skip`."""
    def files() -> list[Path]:
        folder = FORTUNES / subfolder
        found = [p for p in folder.iterdir() if p.is_file() and not p.is_symlink()
                 and not p.suffix and p.name not in skip] if folder.is_dir() else []
        return sorted(p for p in found if not only or p.name in only)
    return files


REGISTERS = {r.name: r for r in [
    Register("code", "the top-level modules of Python's standard library (source code)",
             "Python Software Foundation License 2", "python", _stdlib_modules, code_module),
    Register("legal", "the licence texts of Debian's /usr/share/common-licenses (GPL, LGPL, "
             "GFDL, Apache, MPL, Artistic, BSD, CC0)",
             "each text's own terms (verbatim copies permitted)", "base-files", _licences,
             licence_text),
    Register("verse", "songs and poems from the fortune collection (`songs-poems`)",
             "BSD (fortune-mod)", "fortunes", _fortune_files(".", only=("songs-poems",)),
             fortune_cookies),
    Register("german", "German fortune cookies: quotations, poems, jokes, proverbs (every "
             "file of fortunes-de but its ASCII art)", "GPL-2+", "fortunes-de",
             _fortune_files("de", skip=("asciiart",)), fortune_cookies),
]}


# Loading ------------------------------------------------------------------------------------------


def register_files(name: str) -> list[Path]:
    """The files of a register; a one-line error naming the package when they are missing."""
    register = REGISTERS[name]
    files = register.files()
    if not files:
        install = ("a Python installation with its standard library sources"
                   if register.package == "python" else f"apt-get install {register.package}")
        raise GsaeError(f"the register {name!r} needs the files of the package "
                        f"{register.package!r}, which are not installed: {install}")
    return files


def register_documents(name: str) -> list[str]:
    """The cleaned documents of a register, in the order of the SHA-256 of their text."""
    register = REGISTERS[name]
    docs = [doc for path in register_files(name) for doc in register.documents(_text(path))]
    return sorted(docs, key=lambda d: hashlib.sha256(d.encode()).hexdigest())


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise GsaeError(f"{path} is not UTF-8 text (byte {err.start}): the register's files "
                        "are expected in UTF-8") from None


def register_fingerprint(name: str) -> str:
    """A content hash of a register's files (with the cleaning rules' version)."""
    files = register_files(name)
    root = Path(os.path.commonpath([f.parent for f in files]))
    return f"v{CLEANING_VERSION}-{files_fingerprint(root, files)}"
