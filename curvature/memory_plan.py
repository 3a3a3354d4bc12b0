"""How much memory a K-FAC factor pass needs, per layer and per rank, before it runs.

What is counted: the factor memory only — the sums, the reduction buffer, the eigendecomposition and its
results. The model, its activations, gradients of the Fisher backward and any optimizer state come on top.
Numbers are bytes; the table prints decimal GB (1 GB = 10⁹ bytes), like ``memory_budget_gb``.

Per layer ``l`` with ``A`` of side ``a`` (``in_features``, +1 for a homogeneous bias) and ``G`` of side ``g``
(``out_features``), sums in the accumulation dtype of ``b`` bytes (4 for float32, 8 for float64):

* ``A sum = a² b``, ``G sum = g² b`` — every rank accumulates every tracked layer over its own data;
* ``result``: eigendecompositions in float64, ``8 (a² + a + g² + g)`` (``store="eigen"``), or the
  normalised factors, ``(a² + g²) b`` (``store="factors"``);
* ``workspace``: the owner's transient memory for one layer — the normalised factors ``(a² + g²) b`` and,
  for ``eigen``, about ``4 · 8 · max(a, g)²`` for float64 ``eigh`` of the larger factor (a float64 copy, the
  eigenvectors and LAPACK's ``syevd`` workspace of about two more matrices).

Per rank ``r`` (owners from :func:`memcurve.curvature.owners.assign_owners`; unsharded runs have rank 0 own
every layer), with the sums on the device unless ``offload_to_cpu``:

* collect (device): ``Σ_all (A sum + G sum)``, or with ``separate_passes`` ``max(Σ A sums, Σ G sums)`` (the
  reduced A sums wait in host memory during the G pass); plus, with more than one rank, a copy of the largest
  matrix for the reduction;
* owner (device): ``Σ_owned (A sum + G sum) + max_owned (workspace + result)`` — layers are decomposed one at
  a time and each result moves to host memory at once;
* host: the owned results waiting to be written, the owned A sums between the two passes, and with
  ``offload_to_cpu`` the sums themselves (then the decomposition runs on the CPU as well).

``peak (device) = max(collect, owner)`` is what ``memory_budget_gb`` is checked against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LayerMemory", "MemoryPlan", "MemoryPlanError", "RankMemory", "format_bytes", "plan_memory"]

DTYPE_BYTES = {"float32": 4, "float64": 8}
STORES = ("eigen", "factors")
GB = 10**9


class MemoryPlanError(RuntimeError):
    """The factor memory of some rank does not fit the budget."""


def format_bytes(n: float) -> str:
    """Decimal units: ``1.50 GB``, ``12.3 MB``."""
    for unit, size in (("TB", 10**12), ("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TB", "GB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LayerMemory:
    """Bytes of one layer: its sums in the accumulation dtype, its stored result and the owner's workspace."""

    name: str
    owner: int
    d_A: int
    d_G: int
    A_sum: int
    G_sum: int
    result: int
    workspace: int


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank in each phase (see the module docstring)."""

    rank: int
    layers: tuple[str, ...]
    collect: int
    owner: int
    host: int

    @property
    def peak(self) -> int:
        """Device peak: ``max(collect, owner)``."""
        return max(self.collect, self.owner)


@dataclass(frozen=True)
class MemoryPlan:
    """Per-layer and per-rank factor memory of one configuration; :meth:`table` prints it."""

    layers: tuple[LayerMemory, ...]
    ranks: tuple[RankMemory, ...]
    dtype: str
    store: str
    separate_passes: bool
    offload_to_cpu: bool
    world_size: int

    @property
    def peak(self) -> int:
        """The largest device peak over the ranks."""
        return max(rank.peak for rank in self.ranks)

    @property
    def host_peak(self) -> int:
        return max(rank.host for rank in self.ranks)

    def table(self) -> str:
        """A fixed-width table: one row per layer, then one row per rank."""
        width = max([len("layer"), *(len(layer.name) for layer in self.layers)])
        head = (
            f"K-FAC memory plan: {len(self.layers)} layers, world size {self.world_size}, {self.dtype} sums, "
            f"{'float64 eigendecompositions' if self.store == 'eigen' else f'{self.dtype} factors'} stored"
            + (", A and G in separate passes" if self.separate_passes else "")
            + (", sums offloaded to the CPU" if self.offload_to_cpu else "")
        )
        lines = [head, f"{'layer':<{width}}  owner  {'d_A':>6}  {'d_G':>6}  {'A sum':>9}  {'G sum':>9}  {'result':>9}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.owner:>5}  {layer.d_A:>6}  {layer.d_G:>6}  "
                f"{format_bytes(layer.A_sum):>9}  {format_bytes(layer.G_sum):>9}  {format_bytes(layer.result):>9}"
            )
        lines.append(
            f"{'rank':>4}  {'layers':>6}  {'collect':>9}  {'owner':>9}  {'peak':>9}  {'host':>9}   (device unless host)"
        )
        for rank in self.ranks:
            lines.append(
                f"{rank.rank:>4}  {len(rank.layers):>6}  {format_bytes(rank.collect):>9}  {format_bytes(rank.owner):>9}"
                f"  {format_bytes(rank.peak):>9}  {format_bytes(rank.host):>9}"
            )
        lines.append(
            f"peak per rank: {format_bytes(self.peak)} on the device, {format_bytes(self.host_peak)} host "
            "(factor memory only: the model and its activations come on top)"
        )
        return "\n".join(lines)

    def check(self, budget_gb: float | None) -> None:
        """Raise :class:`MemoryPlanError` when a rank's device peak exceeds ``budget_gb`` (None: no check)."""
        if budget_gb is None:
            return
        budget = budget_gb * GB
        worst = max(self.ranks, key=lambda rank: rank.peak)
        if worst.peak <= budget:
            return
        options = []
        largest = max(self.layers, key=lambda layer: layer.A_sum + layer.G_sum)
        options.append(
            f"restrict `layers` (the largest, {largest.name}, holds "
            f"{format_bytes(largest.A_sum + largest.G_sum)} of sums)"
        )
        if not self.separate_passes:
            options.append(f"separate_passes=True (peak {format_bytes(self.with_options(separate_passes=True).peak)})")
        if not self.offload_to_cpu:
            options.append(
                f"offload_to_cpu=True (device peak {format_bytes(self.with_options(offload_to_cpu=True).peak)})"
            )
        if self.dtype == "float64":
            options.append(f"dtype='float32' (peak {format_bytes(self.with_options(dtype='float32').peak)})")
        if len({layer.owner for layer in self.layers}) == 1 and self.world_size > 1:
            options.append("sharded=True (each rank decomposes and keeps only the layers it owns)")
        options.append("more ranks (each owns fewer layers)")
        raise MemoryPlanError(
            f"the K-FAC factors need {format_bytes(worst.peak)} of device memory on rank {worst.rank} (collect "
            f"{format_bytes(worst.collect)}, owner {format_bytes(worst.owner)}), above memory_budget_gb={budget_gb}"
            f" ({format_bytes(budget)}); options: " + "; ".join(options) + "\n" + self.table()
        )

    def with_options(self, **changes: object) -> MemoryPlan:
        """The plan of the same layers and owners with other options (``dtype``, ``separate_passes``, ...)."""
        options = {
            "dtype": self.dtype,
            "store": self.store,
            "separate_passes": self.separate_passes,
            "offload_to_cpu": self.offload_to_cpu,
            **changes,
        }
        dims = {layer.name: (layer.d_A, layer.d_G) for layer in self.layers}
        owners = {layer.name: layer.owner for layer in self.layers}
        return plan_memory(dims, owners, world_size=self.world_size, **options)


def plan_memory(
    dims: Mapping[str, tuple[int, int]],
    owners: Mapping[str, int],
    *,
    world_size: int,
    dtype: str = "float32",
    store: str = "eigen",
    separate_passes: bool = False,
    offload_to_cpu: bool = False,
) -> MemoryPlan:
    """The plan for layers ``{name: (d_A, d_G)}`` owned by ``owners`` (see the module docstring)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(DTYPE_BYTES)}")
    if store not in STORES:
        raise ValueError(f"store={store!r} is not supported; choose one of {STORES}")
    if not dims:
        raise ValueError("dims is empty: no layers to plan for")
    if set(dims) != set(owners):
        raise ValueError(f"dims and owners must name the same layers: {sorted(dims)} vs {sorted(owners)}")
    if not isinstance(world_size, int) or world_size < 1 or any(not 0 <= r < world_size for r in owners.values()):
        raise ValueError(f"world_size={world_size!r} must be a positive integer above every owner rank")
    b = DTYPE_BYTES[dtype]
    layers = []
    for name, (d_a, d_g) in dims.items():
        normalised = (d_a * d_a + d_g * d_g) * b
        if store == "eigen":
            result = 8 * (d_a * d_a + d_a + d_g * d_g + d_g)
            workspace = normalised + 4 * 8 * max(d_a, d_g) ** 2
        else:
            result, workspace = normalised, normalised
        layers.append(LayerMemory(name, owners[name], d_a, d_g, d_a * d_a * b, d_g * d_g * b, result, workspace))
    all_a = sum(layer.A_sum for layer in layers)
    all_g = sum(layer.G_sum for layer in layers)
    sums = max(all_a, all_g) if separate_passes else all_a + all_g
    buffer = max(max(layer.A_sum, layer.G_sum) for layer in layers) if world_size > 1 else 0
    ranks = []
    for rank in range(world_size):
        owned = [layer for layer in layers if layer.owner == rank]
        owned_sums = sum(layer.A_sum + layer.G_sum for layer in owned)
        owned_a = sum(layer.A_sum for layer in owned)
        work = max((layer.workspace + layer.result for layer in owned), default=0)
        results = sum(layer.result for layer in owned)
        between = owned_a if separate_passes else 0  # reduced A sums in host memory during the G pass
        if offload_to_cpu:
            collect, owner = buffer, 0
            host = max(sums + between, owned_sums + work + results)
        else:
            collect, owner = sums + buffer, (owned_sums + work if owned else 0)
            host = max(between, results)
        ranks.append(RankMemory(rank, tuple(layer.name for layer in owned), collect, owner, host))
    return MemoryPlan(
        tuple(layers), tuple(ranks), dtype, store, bool(separate_passes), bool(offload_to_cpu), world_size
    )
