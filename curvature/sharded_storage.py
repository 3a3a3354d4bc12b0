"""K-FAC factors at scale: one owning rank per layer, per-rank shard files and an index, loaded lazily.

Why. On a billion-parameter model the factors of many layers do not fit on every rank at once. Here every rank
still accumulates the sums of every tracked layer over its own share of the data (the hooks see the full,
unsharded activations and output gradients of each ``nn.Linear`` under DDP and under FSDP alike), but the
cross-rank reduction sends each layer to ONE owning rank (``torch.distributed.reduce``, on any backend, gloo
included), so after it a rank holds only the layers it owns. The owner normalises, eigendecomposes (float64)
and writes its layers to its own shard file; global rank zero writes an index naming, per layer, the file,
the owner, shapes and counts, with the settings, the model fingerprint and the sha256 of every shard.

Owners: :func:`memcurve.curvature.owners.assign_owners` (largest layer first, to the least-loaded rank).

Files. For the stem ``kfac`` and world size ``w``: ``kfac-rank00000-of-0000w.safetensors``, ... — one file per
rank that owns at least one layer, each a regular memcurve factor file (:func:`memcurve.curvature.save_factors`
format: same tensor names, same validated metadata, plus ``extra["shard"]``), so ``load_factors(shard)`` reads
one alone — and ``kfac.index.json``::

    {"format": "memcurve.kfac.index", "version": 1, "kind": "eigen", "world_size": 2,
     "owner_policy": "greedy-largest-first", "model_fingerprint": "…", "settings": {…}, "extra": {…},
     "layers": {"model.model.layers.23.mlp.up_proj": {"file": "kfac-rank00001-of-00002.safetensors",
                "owner": 1, "in_features": 4096, "out_features": 11008, "homogeneous": false,
                "count_A": 20000000, "count_G": 20000000, "shapes": {"eigvals_A": [4096], …}}, …},
     "shards": {"kfac-rank00001-of-00002.safetensors": {"rank": 1, "sha256": "…", "bytes": 1234,
                "layers": ["model.model.layers.23.mlp.up_proj", …]}, …}}

No timestamps: two runs on the same data give the same index up to the shards' sha256 (the last bits of the
float sums depend on the reduction order).

Loading (:func:`load_sharded_factors`, also reached through ``load_factors("….index.json")``). The index is
read and checked at once — format, settings, ``expect``, the model's layer shapes and fingerprint, that every
shard file exists (a missing shard is a ``FactorFileError`` naming the file and its layers). Layers are read
on first access (``stored.layers[name]``): the shard's sha256 is checked against the index the first time the
shard is opened, its metadata against the index, and the layer's tensors against their own sha256; any
mismatch is a ``FactorFileError`` naming the shard file and the layer. Only the requested layer's tensors are
read (safetensors maps the file).

Under FSDP, module names carry wrapper segments (``_fsdp_wrapped_module.``) and parameters are sharded views,
so layer names are matched with those segments removed (:func:`clean_module_name`) and the model fingerprint
must be computed before the model is wrapped (``KFACFactors`` does it in ``setup``) and passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from memcurve.curvature.eigen import LayerEigen
from memcurve.curvature.factor_file import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    METADATA_KEY,
    FactorFileError,
    StoredFactors,
    _expected_shapes,
    _kind_of,
    _settings_problem,
    _sha256,
    canonical_settings,
    check_layers_match_model,
    model_fingerprint,
    write_factor_file,
)
from memcurve.curvature.layers import WEIGHT_LAYOUTS, named_linear_modules
from memcurve.curvature.owners import check_owners
from memcurve.curvature.sums import LayerFactors
from memcurve.utils.distributed import is_distributed
from memcurve.utils.files import atomic_write

__all__ = [
    "INDEX_FORMAT",
    "OWNER_POLICY",
    "ShardedLayers",
    "index_path_for",
    "is_index_path",
    "load_sharded_factors",
    "save_sharded_factors",
    "shard_name",
]


INDEX_FORMAT = "memcurve.kfac.index"


INDEX_VERSION = 1


INDEX_SUFFIX = ".index.json"


OWNER_POLICY = "greedy-largest-first"


def index_path_for(folder: str | os.PathLike, stem: str) -> Path:
    """``<folder>/<stem>.index.json``."""
    return Path(folder) / f"{stem}{INDEX_SUFFIX}"


def shard_name(stem: str, rank: int, world_size: int) -> str:
    """``<stem>-rank{rank:05d}-of-{world_size:05d}.safetensors``."""
    return f"{stem}-rank{rank:05d}-of-{world_size:05d}.safetensors"


def _file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_sharded_factors(
    folder: str | os.PathLike,
    layers: Mapping[str, LayerFactors | LayerEigen],
    *,
    model: nn.Module,
    settings: Mapping[str, Any],
    owners: Mapping[str, int] | None = None,
    world_size: int | None = None,
    stem: str = "kfac",
    extra: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
    index_owner_rank: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Write per-rank shard files and the index (see the module docstring); returns the index path on every rank.

    Distributed (an initialised process group with more than one rank): a collective. ``layers`` are the layers
    THIS rank owns (``owners[name] == rank``, e.g. the eigendecompositions of :func:`reduce_to_owners`' output)
    and ``owners`` the same complete mapping on every rank; each rank writes its shard, then the shard
    descriptions are gathered and rank ``index_owner_rank`` writes the index; a barrier follows.

    Single process: ``layers`` holds every layer and all shards are written here — one per owner rank of
    ``owners`` (default: everything on rank 0) in a world of ``world_size`` (default: ``max(owners) + 1``), the
    same files a distributed run with those owners writes.

    ``model``: the module the layer names refer to (wrapper segments are ignored); ``fingerprint``: its
    :func:`model_fingerprint` when ``model`` is wrapped (FSDP shards parameters, so compute it before wrapping).
    ``settings`` as for ``save_factors``; ``extra``: JSON-serialisable information, kept in the index and shards.
    """
    folder = Path(folder)
    problem = _settings_problem(settings)
    if problem:
        raise ValueError(problem)
    if not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"stem={stem!r} must be a non-empty file name stem")
    distributed = is_distributed()
    rank = dist.get_rank(group) if distributed else 0
    if distributed:
        world_size = dist.get_world_size(group)
        if owners is None:
            raise ValueError("owners is required in a distributed run (the same mapping on every rank)")
    else:
        owners = dict(owners) if owners is not None else dict.fromkeys(layers, 0)
        world_size = world_size if world_size is not None else max(owners.values(), default=0) + 1
        if set(owners) != set(layers):
            raise ValueError(
                f"single process: layers {sorted(layers)} and owners {sorted(owners)} must name the same layers"
            )
    check_owners(owners, owners, world_size)
    if not 0 <= index_owner_rank < world_size:
        raise ValueError(f"index_owner_rank={index_owner_rank} is not a rank of a world of size {world_size}")
    mine = {n for n, r in owners.items() if r == rank} if distributed else set(owners)
    if set(layers) != mine:
        raise ValueError(
            f"rank {rank}: layers {sorted(layers)} are not the layers it owns {sorted(mine)}; pass this rank's own "
            "layers (reduce_to_owners returns them)"
        )
    kind = _kind_of(layers) if layers else None
    modules = named_linear_modules(model)
    unknown = sorted(set(owners) - set(modules))
    if unknown:
        raise ValueError(f"layers {unknown} are not nn.Linear (or Conv1D) modules of the model")
    fingerprint = fingerprint if fingerprint is not None else model_fingerprint(model)
    extra = dict(extra or {})
    json.dumps(extra)  # fails here, before any file is touched, if not serialisable

    index_path = index_path_for(folder, stem)
    described: list[dict[str, Any]] = []
    ranks = [rank] if distributed else sorted(set(owners.values()))
    for r in ranks:
        names = [n for n in owners if owners[n] == r]
        if not names:
            continue
        file = shard_name(stem, r, world_size)
        shard_extra = {**extra, "shard": {"rank": r, "world_size": world_size, "index": index_path.name}}
        layer_meta = write_factor_file(
            folder / file, {n: layers[n] for n in names}, modules, kind, settings, fingerprint, shard_extra
        )
        described.append(
            {
                "file": file,
                "rank": r,
                "kind": kind,
                "sha256": _file_sha256(folder / file),
                "bytes": (folder / file).stat().st_size,
                "layers": layer_meta,
                "shapes": {n: {k: list(getattr(layers[n], k).shape) for k in KINDS[kind]} for n in names},
            }
        )
    if distributed:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, described, group=group)
        described = [item for part in gathered for item in part]
    kinds = {item["kind"] for item in described}
    if len(kinds) != 1:
        raise ValueError(f"the shards hold kinds {sorted(map(str, kinds))}: all layers must be factors or all eigen")
    if rank == index_owner_rank:
        index_layers: dict[str, Any] = {}
        for item in sorted(described, key=lambda item: item["rank"]):
            for name, meta in item["layers"].items():
                index_layers[name] = {
                    "file": item["file"],
                    "owner": item["rank"],
                    **meta,
                    "shapes": item["shapes"][name],
                }
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "kind": kinds.pop(),
            "world_size": world_size,
            "owner_policy": OWNER_POLICY,
            "model_fingerprint": fingerprint,
            "settings": dict(settings),
            "extra": extra,
            "layers": {name: index_layers[name] for name in sorted(index_layers)},
            "shards": {
                item["file"]: {
                    "rank": item["rank"],
                    "sha256": item["sha256"],
                    "bytes": item["bytes"],
                    "layers": sorted(item["layers"]),
                }
                for item in sorted(described, key=lambda item: item["rank"])
            },
        }
        text = json.dumps(index, indent=1, sort_keys=True)
        atomic_write(index_path, lambda tmp: tmp.write_text(text))
    if distributed:
        dist.barrier(group=group)
    return index_path


class ShardedLayers(Mapping):
    """``{layer: LayerEigen | LayerFactors}`` read from the shards on first access (validated), then cached.

    ``evict(name)`` forgets a cached layer (to edit layer by layer in bounded memory); ``load(name)`` reads
    and validates a layer without caching it.
    """

    def __init__(self, index_path: Path, index: Mapping[str, Any], device: str | torch.device = "cpu") -> None:
        self.index_path = index_path
        self.folder = index_path.parent
        self.index = index
        self.device = device
        self._cache: dict[str, LayerFactors | LayerEigen] = {}
        self._checked_shards: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> LayerFactors | LayerEigen:
        if name not in self._cache:
            self._cache[name] = self.load(name)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index["layers"])

    def __len__(self) -> int:
        return len(self.index["layers"])

    def __contains__(self, name: object) -> bool:
        return name in self.index["layers"]

    def __repr__(self) -> str:
        return f"ShardedLayers({self.index_path}, {len(self)} layers, {len(self._cache)} loaded)"

    @property
    def loaded(self) -> tuple[str, ...]:
        """The layers read so far (and still cached)."""
        return tuple(self._cache)

    def evict(self, name: str) -> None:
        self._cache.pop(name, None)

    def shard_path(self, name: str) -> Path:
        if name not in self.index["layers"]:
            raise KeyError(name)
        return self.folder / self.index["layers"][name]["file"]

    def _shard_meta(self, path: Path, name: str) -> dict[str, Any]:
        """The validated metadata of the shard holding ``name`` (its file hash checked once)."""
        file = path.name
        if file in self._checked_shards:
            return self._checked_shards[file]
        where = f"{path}: shard of layer {name!r} (index {self.index_path.name})"
        if not path.is_file():
            raise FactorFileError(f"{where} is missing")
        expected = self.index["shards"][file]["sha256"]
        digest = _file_sha256(path)
        if digest != expected:
            raise FactorFileError(f"{where} is corrupted or was replaced: sha256 {digest}, the index says {expected}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                raw = fh.metadata() or {}
            meta = json.loads(raw[METADATA_KEY])
        except Exception as exc:
            raise FactorFileError(
                f"{where} is not a readable memcurve factor file ({type(exc).__name__}: {exc})"
            ) from exc
        if isinstance(meta.get("settings"), dict):
            meta["settings"] = canonical_settings(meta["settings"])  # as the index's (old files: fisher_type)
        for key, want in (
            ("format", FORMAT),
            ("version", FORMAT_VERSION),
            ("kind", self.index["kind"]),
            ("model_fingerprint", self.index["model_fingerprint"]),
            ("settings", self.index["settings"]),
        ):
            if meta.get(key) != want:
                raise FactorFileError(f"{where}: {key} is {meta.get(key)!r}, the index says {want!r}")
        listed = sorted(n for n, info in self.index["layers"].items() if info["file"] == file)
        if sorted(meta.get("layers", {})) != listed:
            raise FactorFileError(f"{where}: holds layers {sorted(meta.get('layers', {}))}, the index lists {listed}")
        self._checked_shards[file] = meta
        return meta

    def load(self, name: str) -> LayerFactors | LayerEigen:
        """Read and validate one layer (not cached)."""
        info = self.index["layers"].get(name)
        if info is None:
            raise KeyError(f"layer {name!r} is not in {self.index_path}; its layers: {sorted(self.index['layers'])}")
        path = self.folder / info["file"]
        meta = self._shard_meta(path, name)
        where = f"{path}: layer {name!r}"
        layer_meta = meta["layers"][name]
        for key in ("in_features", "out_features", "homogeneous", "count_A", "count_G"):
            if layer_meta.get(key) != info.get(key):
                raise FactorFileError(f"{where}: {key} is {layer_meta.get(key)!r}, the index says {info.get(key)!r}")
        layouts = layer_meta.get("weight_layout", "out_in"), info.get("weight_layout", "out_in")
        if layouts[0] != layouts[1]:
            raise FactorFileError(f"{where}: weight_layout is {layouts[0]!r}, the index says {layouts[1]!r}")
        kind = self.index["kind"]
        parts = []
        try:
            with safe_open(str(path), framework="pt", device=str(self.device)) as fh:
                for key in KINDS[kind]:
                    t = fh.get_tensor(f"{name}/{key}")
                    tensor_info = meta["tensors"][f"{name}/{key}"]
                    found = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for field_name, value in found.items():
                        if tensor_info.get(field_name) != value:
                            raise FactorFileError(
                                f"{where}: tensor {key!r} has {field_name} {value}, metadata says "
                                f"{tensor_info.get(field_name)}"
                            )
                    if list(t.shape) != info["shapes"][key]:
                        raise FactorFileError(
                            f"{where}: {key} has shape {list(t.shape)}, the index says {info['shapes'][key]}"
                        )
                    digest = _sha256(t.to("cpu").contiguous())
                    if digest != tensor_info.get("sha256"):
                        raise FactorFileError(f"{where}: tensor {key!r} is corrupted (sha256 {digest})")
                    parts.append(t)
        except FactorFileError:
            raise
        except Exception as exc:
            raise FactorFileError(f"{where}: cannot be read ({type(exc).__name__}: {exc})") from exc
        counts = (int(info["count_A"]), int(info["count_G"]))
        return LayerFactors(*parts, *counts) if kind == "factors" else LayerEigen(*parts, *counts)


def _read_index(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such factor index")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactorFileError(f"{path}: not a readable JSON factor index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise FactorFileError(f"{path}: format is {found!r}, expected {INDEX_FORMAT!r}")
    if index.get("version") != INDEX_VERSION:
        raise FactorFileError(f"{path}: index version {index.get('version')!r}, this memcurve reads {INDEX_VERSION}")
    for key in ("kind", "world_size", "model_fingerprint", "settings", "layers", "shards"):
        if key not in index:
            raise FactorFileError(f"{path}: the index lacks {key!r}")
    if index["kind"] not in KINDS:
        raise FactorFileError(f"{path}: kind {index['kind']!r}, expected one of {tuple(KINDS)}")
    if not isinstance(index["settings"], dict):
        raise FactorFileError(f"{path}: settings is {index['settings']!r}, expected a JSON object")
    index["settings"] = canonical_settings(index["settings"])  # indexes written before a rename: fisher_type
    problem = _settings_problem(index["settings"])
    if problem:
        raise FactorFileError(f"{path}: {problem}")
    fields = ("file", "owner", "in_features", "out_features", "homogeneous", "count_A", "count_G", "shapes")
    for name, info in index["layers"].items():
        if not isinstance(info, dict) or any(f not in info for f in fields):
            raise FactorFileError(f"{path}: layer {name!r} lacks one of {fields}: {info!r}")
        counts = (info["count_A"], info["count_G"])
        if not all(isinstance(c, int) and c > 0 for c in counts):
            raise FactorFileError(f"{path}: layer {name!r} has counts {counts}, expected positive integers")
        if info.get("weight_layout", "out_in") not in WEIGHT_LAYOUTS:
            raise FactorFileError(
                f"{path}: layer {name!r} has weight_layout {info['weight_layout']!r}, expected one of {WEIGHT_LAYOUTS}"
            )
        shard = index["shards"].get(info["file"])
        if shard is None or shard.get("rank") != info["owner"] or name not in shard.get("layers", ()):
            raise FactorFileError(f"{path}: layer {name!r} names shard {info['file']!r}, which the index does not list")
        d_in = info["in_features"] + int(info["homogeneous"])
        want = {k: list(v) for k, v in _expected_shapes(index["kind"], d_in, info["out_features"]).items()}
        if info["shapes"] != want:
            raise FactorFileError(f"{path}: layer {name!r} has shapes {info['shapes']}, its features imply {want}")
    for file, shard in index["shards"].items():
        if not (path.parent / file).is_file():
            raise FactorFileError(
                f"{path.parent / file}: shard of layers {shard.get('layers')} is missing (listed in {path.name})"
            )
    return index


def load_sharded_factors(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> StoredFactors:
    """Read an index written by :func:`save_sharded_factors`; ``layers`` is a lazy :class:`ShardedLayers`.

    Checks at once what the index says (see the module docstring), ``expect``-ed settings and, given ``model``,
    every layer's shape and bias convention and the model fingerprint; shards are validated on first access.
    """
    path = Path(path)
    index = _read_index(path)
    settings = index["settings"]
    for key, value in canonical_settings(expect or {}).items():
        if settings.get(key) != value:
            raise FactorFileError(f"{path}: setting {key!r} is {settings.get(key)!r}, expected {value!r}")
    if model is not None:
        check_layers_match_model(
            path, "index", index["layers"], settings, index["model_fingerprint"], model, named_linear_modules(model)
        )
    extra = {**index.get("extra", {}), "sharded": {"world_size": index["world_size"], "shards": index["shards"]}}
    layer_info = {
        name: {k: v for k, v in info.items() if k not in ("file", "owner", "shapes")}
        for name, info in index["layers"].items()
    }
    return StoredFactors(
        path,
        index["kind"],
        ShardedLayers(path, index, device),
        dict(settings),
        index["model_fingerprint"],
        extra,
        layer_info,
    )


def is_index_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a sharded-factor index (``*.index.json``) rather than a single factor file."""
    return str(path).endswith(INDEX_SUFFIX)
