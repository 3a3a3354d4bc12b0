"""Files that are either absent, the old version or complete (atomic writes), and the checks before writing any:
a writable output folder, no file of another run overwritten."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

__all__ = ["atomic_write", "check_output_folder", "refuse_overwriting", "replace_between_markers"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create ``path`` through ``write(temporary_path)`` so that it is either absent, the old file or complete.

    The temporary file sits in the same folder (so ``os.replace`` is an atomic rename), is fsynced before the
    rename and removed if ``write`` fails; the folder is fsynced afterwards where the platform allows. The file gets
    the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` minus the umask, as Lightning's
    checkpoints), not the private ``0o600`` of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def check_output_folder(argument: str, folder: str | os.PathLike, min_free_bytes: int = 1) -> Path:
    """Refuse, with one line naming ``argument`` and ``folder``, a folder that outputs could not be written to.

    ``folder`` must be a folder or not exist yet; then its nearest existing ancestor must be a folder this user may
    write to (it is created on the first write), on a disk with at least ``min_free_bytes`` free (where the platform
    reports it). Nothing is created. Returns ``folder`` as a ``Path``.
    """
    folder = Path(folder)
    shown = f"{argument}={str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{shown} is a file, not a folder; pass a folder (it is created when missing)")
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{shown} cannot be created: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{shown} is not writable: this user may not create files in {str(existing)!r}")
    try:
        free = shutil.disk_usage(existing).free
    except OSError:  # not reported here: nothing to check
        free = None
    if free is not None and free < min_free_bytes:
        raise ValueError(f"{shown} is on a full disk ({free} bytes free in {str(existing)!r})")
    return folder


def refuse_overwriting(argument: str, paths: Iterable[str | os.PathLike], owned: Collection[str] = ()) -> None:
    """Refuse, with one line naming ``argument``, to replace any of ``paths`` that exists and is not in ``owned``.

    ``owned``: absolute paths (``os.path.abspath``) of the files the caller wrote itself in this run; those may be
    replaced. Callers skip this check when told to overwrite.
    """
    foreign = [str(p) for p in paths if Path(p).exists() and os.path.abspath(p) not in owned]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise ValueError(
            f"{argument}: refusing to overwrite {listed}, not written by this run; choose another {argument}, "
            "move the existing file away, or pass overwrite=True"
        )


def replace_between_markers(path: str | os.PathLike, begin: str, end: str, text: str) -> None:
    """Replace what stands between the ``begin`` and ``end`` marker lines of a text file (a generated block of a
    README) with ``text``, atomically; a file without both markers is refused with the fix."""
    path = Path(path)
    content = path.read_text()
    if begin not in content or end not in content:
        raise ValueError(f"{path}: no {begin} ... {end} markers; add them where the generated text goes")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write(path, lambda tmp: tmp.write_text(f"{head}{begin}\n{text}\n{end}{tail}"))
