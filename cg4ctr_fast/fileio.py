"""Crash-safe file writes: a reader sees the old file or folder or the whole new one, never a part.

Every writer in the package (model folders, engine folders, checkpoints, reports) goes through
`atomic_write_bytes` or `atomic_dir`.  `check_out_dir` is the one rule for an output folder, checked
before any work by the commands and by library writers (export) alike.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cg4ctr_fast.errors import InputError


def path_label(path: str | os.PathLike[str]) -> str:
    """The path as the user typed it, made safe to print on one line."""
    text = os.fspath(path)
    # A file name may legally contain a newline or other control characters; repr() shows them
    # escaped instead of breaking the one-line message.
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return repr(text)
    return text


def check_out_dir(path: str | os.PathLike[str], *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check an output folder before any work; returns it as a Path.

    Raises InputError (one line) when the path is empty, when it is a file, when its nearest existing
    ancestor is not a folder or cannot be written, when it is an existing folder that cannot be written
    (read-only file system, no permission), or when it exists, is not empty and `overwrite` is False.
    With `overwrite` the caller replaces it atomically (`atomic_dir`) once the work is done; the working
    folder, one of its parents and the home folder are refused even then, since replacing deletes the old
    folder.  A mount point (a Docker volume, `-v host:/out`) cannot be renamed, so it is accepted only
    while empty (atomic_dir then fills it in place) and refused with `overwrite` when it is not empty.
    `flag` names the option in the message (e.g. "--out").
    """
    if os.fspath(path) == "":
        # Path("") is Path("."): an empty --out would silently mean the working folder.
        raise InputError(f"{flag}: empty path; name an output folder")
    out = Path(path)
    label = path_label(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {label}: exists and is not a folder")
    mount = out.is_dir() and is_mount_point(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{flag} {label}: folder exists and is not empty; pass --overwrite to replace it, "
                             "or choose another path")
        if mount:
            raise InputError(f"{flag} {label}: is a mount point and not empty; a mount point cannot be "
                             "replaced as a whole: empty it, or choose a new folder inside it")
        resolved, cwd = out.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            raise InputError(f"{flag} {label}: --overwrite would delete the current, a parent or the home "
                             "folder; choose a folder of its own")
    if out.is_dir():
        _check_writable_folder(out, flag, label)
    if not mount:
        # Only a folder that atomic_dir renames (a new one, or an existing one being replaced) needs
        # its parent writable; an empty mount point is filled in place.
        _check_writable_parent(out, flag)
    return out


def check_run_dir(path: str | os.PathLike[str], *, flag: str = "--out") -> Path:
    """Check a resumable run folder before any work: not a file, and writable (or creatable).

    Whether an existing, non-empty one may be continued is the command's own rule (`cycle --resume`).
    An empty path is refused (Path("") is the working folder).
    """
    if not str(path).strip():
        raise InputError(f"{flag}: empty path; name a folder")
    out = Path(path)
    if not out.is_dir():
        return check_out_dir(out, flag=flag)  # missing: its nearest existing ancestor must take a folder
    _check_writable_folder(out, flag, str(out))
    return out


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a mount point (bind mounts within one file system included).

    os.path.ismount compares device numbers, so it misses a bind mount of a folder of the same file
    system (`mount --bind a b`); /proc/self/mountinfo (Linux) lists those too.  False when unknown.
    """
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    for line in lines:
        fields = line.split(" ")
        # Field 5 is the mount point, with space, tab, newline and backslash written as octal escapes.
        if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]) == real:
            return True
    return False


def _check_writable_folder(out: Path, flag: str, label: str) -> None:
    # os.access reports a read-only file system (EROFS) even for root; the probe also catches special
    # file systems where root passes os.access but cannot create anything.
    if not os.access(out, os.W_OK):
        raise InputError(f"{flag} {label}: folder cannot be written (read-only file system or no permission)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cg4ctr-probe-", dir=out))
    except OSError as exc:
        raise InputError(f"{flag} {label}: cannot create folders in it ({exc.strerror or exc})") from None


def _check_writable_parent(out: Path, flag: str) -> None:
    # The nearest existing ancestor decides: atomic_dir creates missing parents (mkdir -p).
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {out}: {ancestor} is not a folder")
    # A real probe, not os.access: root passes os.access on read-only special filesystems such as /proc.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cg4ctr-probe-", dir=ancestor))
    except OSError as exc:
        raise InputError(f"{flag} {out}: cannot create folders in {ancestor} ({exc.strerror or exc})") from None


def _fsync_dir(directory: str | os.PathLike[str]) -> None:
    # Makes the rename itself durable across a power cut; best effort because some platforms
    # (Windows) and filesystems cannot open or fsync a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(final: Path, kind: str) -> Path:
    # Hidden, in the same directory (so os.replace is an atomic same-filesystem rename), and
    # recognisable if a crash ever leaves one behind.
    return final.parent / f".{final.name}.{kind}-{secrets.token_hex(6)}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path next to `path`; when the block succeeds the file written there is fsynced and
    renamed over `path` (readers see the old file or the whole new one), else it is removed.

    For writers that want a path rather than bytes (pyarrow's ParquetWriter, say).  The temporary file is created
    empty with os.open(..., 0o666) rather than mkstemp, so the umask applies and the result has the permissions an
    ordinary open() would give (mkstemp forces 0600).
    """
    final = Path(path)
    while True:
        tmp = _temp_name(final, "tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            os.close(fd)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so readers see either the old file or the whole new one (see `atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `final_path` only if the block succeeds.

    The directory is created next to `final_path` (same parent, named `.{name}.tmp-<random>`) so
    the final rename is atomic.  Missing parent directories are created (mkdir -p; they stay if
    the block fails).  On normal exit:
    - `final_path` absent: the temporary directory is renamed to it.
    - `final_path` an existing directory (or a symlink): it is renamed aside, the new directory
      renamed in, then the old one deleted.  Readers never see a half-written directory; there
      is only a moment between the two renames when `final_path` does not exist.
    - `final_path` an existing, empty mount point (a Docker volume; the kernel refuses to rename
      one, EBUSY): the temporary directory is made INSIDE it (same file system) and its entries
      are renamed up one by one, then it is removed.  Each entry appears whole, but the folder as a
      whole is not swapped atomically: a reader may see some entries before the others.
    - `final_path` an existing file, or a mount point that is not empty: InputError, raised on
      entry (before any work is done).
    A rename that the system refuses at the end (EPERM, EBUSY, EXDEV, ...) raises InputError (one
    line, with the reason) and leaves `final_path` as it was.  On an exception (KeyboardInterrupt
    included) the temporary directory is removed and the exception re-raised, leaving `final_path`
    as it was.
    """
    final = Path(final_path)
    label = path_label(final_path)
    if final.exists() and not final.is_dir():
        raise InputError(f"{label}: exists and is not a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    mount = final.is_dir() and is_mount_point(final)
    if mount and any(final.iterdir()):
        raise InputError(f"{label}: is a mount point and not empty; a mount point cannot be replaced as "
                         "a whole: empty it, or choose a new folder inside it")

    while True:
        tmp = final / f".cg4ctr.tmp-{secrets.token_hex(6)}" if mount else _temp_name(final, "tmp")
        try:
            # 0o777 with the umask applied, like mkdir; mkdtemp would force 0700.
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:
            continue

    try:
        yield tmp
        if mount:
            _move_entries_up(tmp, final, label)
        else:
            _move_into_place(tmp, final, label)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final if mount else final.parent)


def _move_entries_up(tmp: Path, final: Path, label: str) -> None:
    # Fills an empty mount point from a temporary folder inside it; on a failure the entries already
    # moved go back into the temporary folder (which the caller deletes), so the mount stays empty.
    moved: list[str] = []
    try:
        for name in sorted(os.listdir(tmp)):
            if os.path.lexists(final / name):
                raise InputError(f"{label}: {name} appeared in the mount point while working; nothing was "
                                 "written")
            os.rename(tmp / name, final / name)
            moved.append(name)
    except BaseException as exc:
        for name in moved:
            with contextlib.suppress(OSError):
                os.rename(final / name, tmp / name)
        if isinstance(exc, OSError):
            raise InputError(f"{label}: cannot move the result into the mount point "
                             f"({exc.strerror or exc}); nothing was written") from None
        raise
    os.rmdir(tmp)


def _move_into_place(tmp: Path, final: Path, label: str) -> None:
    try:
        _rename_into_place(tmp, final, label)
    except OSError as exc:
        # EPERM, EBUSY (a mount point appeared), EXDEV, ...: the user's folder, not the program, is at
        # fault; the previous output, if any, is still in place.
        raise InputError(f"{label}: cannot put the result in place ({exc.strerror or exc}); "
                         "the previous output, if any, is kept") from None


def _rename_into_place(tmp: Path, final: Path, label: str) -> None:
    if not (final.is_symlink() or final.exists()):
        os.rename(tmp, final)
        return
    if final.exists() and not final.is_dir():
        # Became a file while the block ran.
        raise InputError(f"{label}: exists and is not a directory")
    old = _temp_name(final, "old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        # Put the previous result back rather than leave the user with neither.
        os.rename(old, final)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        # The new result is already in place; failing to delete the old one must not turn a
        # success into an error, so leftovers are ignored (they are hidden, named `.*.old-*`).
        shutil.rmtree(old, ignore_errors=True)
