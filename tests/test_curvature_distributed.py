"""World size 2 (gloo, CPU, torch.multiprocessing spawn) gives the same factors as one process on all the data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from memcurve.curvature import KFACTracker, all_reduce_sums, fisher_backward
from memcurve.utils.distributed import is_distributed

RTOL = 1e-12  # float64; only the order of the cross-rank sum differs
ATOL = 1e-14
WORLD_SIZE = 2
BATCH = 7  # odd: the ranks hold different numbers of examples and positions


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 4, 1, 3, 5, 2])[:, None]
    return model, x, mask


def accumulate(rows: list[int]) -> KFACTracker:
    model, x, mask = build()
    index = torch.arange(BATCH)
    with KFACTracker(model, ["0", "2"], dtype=torch.float64, drop_last_position=True) as tracker:
        for i in rows:  # one example per step: ranks run different numbers of steps
            tracker.set_mask(mask[i : i + 1])
            fisher_backward(
                model(x[i : i + 1]), seed=5, example_index=index[i : i + 1], mc_samples=2, mask=mask[i : i + 1]
            )
    return tracker


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        tracker = accumulate(list(range(rank, BATCH, WORLD_SIZE)))
        assert is_distributed()
        factors = tracker.finalize(reduce_across_ranks=True)
        local = tracker.finalize(reduce_across_ranks=False)
        torch.save({"reduced": factors, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_world_size_two_matches_one(tmp_path: Path):
    # Each rank runs this file as a script: no need to import the test module by a package name in the
    # children (a site-packages `tests` package could shadow it).
    ranks = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(tmp_path / "init"), str(tmp_path)])
        for rank in range(WORLD_SIZE)
    ]
    assert [process.wait(timeout=300) for process in ranks] == [0] * WORLD_SIZE
    single = accumulate(list(range(BATCH))).finalize()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for name, want in single.items():
        # the local halves really are different, so the test exercises the reduction
        assert results[0]["local"][name].count_A != want.count_A
        for result in results:
            got = result["reduced"][name]
            assert (got.count_A, got.count_G) == (want.count_A, want.count_G)
            torch.testing.assert_close(got.A, want.A, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(got.G, want.G, rtol=RTOL, atol=ATOL)


def test_single_process_reduce_is_identity():
    tracker = accumulate([0, 1])
    reduced = all_reduce_sums(tracker.sums())
    for name, s in tracker.sums().items():
        assert torch.equal(reduced[name].A_sum, s.A_sum) and reduced[name].A_sum is not s.A_sum
        assert int(reduced[name].count_G) == int(s.count_G)


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], sys.argv[3])
