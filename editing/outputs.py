"""Where edited checkpoints go and how they are written: their own folder, lossless names, atomic, never over a
file this run did not create.

An edited copy of ``<dir>/<stem>.ckpt`` is ``<dir>/edited/<stem>-<request tag>.ckpt`` (or under the folder given):
outside the folder Lightning searches for ``last`` / ``best`` checkpoints, so ``ckpt_path="last"`` never resumes
from an edited copy. The payload is the source checkpoint with ``state_dict`` replaced and ``memcurve_edit``
recording the source, the request and the edited layers.

What may be replaced (:class:`OutputGuard`): a file this run wrote, anything with ``overwrite=True``, and — for the
pruning callbacks (``follow_sources=True``) — an edited copy of the very source being edited again (Lightning
rewrites ``last.ckpt`` every epoch, also in a resumed run, and its edited copies follow it). Nothing else. Copies
also follow their source when Lightning removes it (:func:`remove_edited_copies`). Output folders are checked
before any work with :func:`memcurve.utils.files.check_output_folder` (not a file, writable, not on a full disk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memcurve.editing.request import EditRequest
from memcurve.utils.files import atomic_write

__all__ = [
    "EDITED_FOLDER",
    "EDIT_KEY",
    "OutputGuard",
    "edit_record",
    "edited_checkpoint_path",
    "is_edited_copy_of",
    "remove_edited_copies",
    "write_edited_checkpoint",
]

EDITED_FOLDER = "edited"
EDIT_KEY = "memcurve_edit"  # the checkpoint entry that marks (and describes) an edited copy


def edited_checkpoint_path(
    source: str | os.PathLike, request: EditRequest, folder: str | os.PathLike | None = None
) -> Path:
    """``<folder or <source dir>/edited>/<source stem>-<request tag><suffix>``.

    ``folder`` may not be the source's own folder: Lightning's ``ckpt_path="last"`` lookup would find
    ``last-<tag>.ckpt`` there (and resume from it, the newest file)."""
    source = Path(source)
    if folder is not None and Path(folder).resolve() == source.parent.resolve():
        raise ValueError(
            f"folder={str(folder)!r} is the folder of the source checkpoint, where Lightning looks for last / best "
            f"checkpoints; write edited copies elsewhere (default: {str(source.parent / EDITED_FOLDER)!r})"
        )
    folder = Path(folder) if folder is not None else source.parent / EDITED_FOLDER
    return folder / f"{source.stem}-{request.tag}{source.suffix or '.ckpt'}"


def edit_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``memcurve_edit`` record of a checkpoint file (None: not an edited copy, or not readable as one).

    Read with ``weights_only=True`` and memory-mapped: only the small pickle is parsed, no foreign code runs."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint, or one with objects beyond plain data: not one of ours
        return None
    record = payload.get(EDIT_KEY) if isinstance(payload, dict) else None
    return record if isinstance(record, dict) else None


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def is_edited_copy_of(path: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether ``path`` is an edited copy whose recorded source is ``source``."""
    record = edit_record(path)
    return record is not None and _same_file(str(record.get("source", "")), source)


class OutputGuard:
    """Remembers the files this run created, and refuses to replace any other existing file unless ``overwrite``.

    ``follow_sources``: an edited copy of the source now being edited may also be replaced (its source was
    rewritten: Lightning's ``last.ckpt``, also across a resumed run)."""

    def __init__(self, overwrite: bool = False, follow_sources: bool = False) -> None:
        self.overwrite = overwrite
        self.follow_sources = follow_sources
        self.created: set[Path] = set()

    def check(self, path: str | os.PathLike, argument: str = "output", source: str | os.PathLike | None = None) -> Path:
        path = Path(path)
        if not path.exists() or self.overwrite or path.resolve() in self.created:
            return path
        if self.follow_sources and source is not None and is_edited_copy_of(path, source):
            return path
        raise FileExistsError(
            f"{argument}={str(path)!r} already exists and was not written by this run; choose another path or "
            "pass overwrite=True"
        )

    def record(self, path: str | os.PathLike) -> None:
        self.created.add(Path(path).resolve())


def write_edited_checkpoint(
    path: str | os.PathLike,
    checkpoint: dict[str, Any],
    state_dict: dict[str, Any],
    request: EditRequest,
    source: str | os.PathLike,
    layer_names: list[str],
    guard: OutputGuard,
) -> Path:
    """Write ``checkpoint`` with ``state_dict`` as an edited copy at ``path`` (atomically); returns the path."""
    path = guard.check(path, source=source)
    payload = dict(checkpoint)
    payload["state_dict"] = state_dict
    payload[EDIT_KEY] = {"source": str(source), **asdict(request), "layer_names": list(layer_names)}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    guard.record(path)
    return path


def remove_edited_copies(
    source: str | os.PathLike, requests: Sequence[EditRequest], folder: str | os.PathLike | None = None
) -> list[Path]:
    """Delete the edited copies of ``source`` for ``requests`` (those whose record names ``source``; any other file
    at those paths stays); returns the deleted paths. Called when Lightning removes ``source``."""
    removed = []
    for request in requests:
        path = edited_checkpoint_path(source, request, folder)
        if path.is_file() and is_edited_copy_of(path, source):
            path.unlink()
            removed.append(path)
    return removed
