"""Where edited checkpoints go and how they are written: their own folder, lossless names, atomic, never over a
file this run did not create.

An edited copy of ``<dir>/<stem>.ckpt`` is ``<dir>/edited/<stem>-<request tag>.ckpt`` (or under the folder given):
outside the folder Lightning searches for ``last`` / ``best`` checkpoints, so ``ckpt_path="last"`` never resumes
from an edited copy. The payload is the source checkpoint with ``state_dict`` replaced and ``memcurve_edit``
recording the source, the request and the edited layers.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from memcurve.editing.request import EditRequest
from memcurve.utils.files import atomic_write

__all__ = ["EDITED_FOLDER", "EDIT_KEY", "OutputGuard", "edited_checkpoint_path", "write_edited_checkpoint"]

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


class OutputGuard:
    """Remembers the files this run created, and refuses to replace any other existing file unless ``overwrite``."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self.created: set[Path] = set()

    def check(self, path: str | os.PathLike, argument: str = "output") -> Path:
        path = Path(path)
        if path.exists() and not self.overwrite and path.resolve() not in self.created:
            raise FileExistsError(
                f"{argument}={str(path)!r} already exists and was not written by this run; choose another path or "
                "pass overwrite=True"
            )
        return path

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
    path = guard.check(path)
    payload = dict(checkpoint)
    payload["state_dict"] = state_dict
    payload[EDIT_KEY] = {"source": str(source), **asdict(request), "layer_names": list(layer_names)}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    guard.record(path)
    return path
