"""How fast are batched greedy decoding and the K-FAC factor pass on a tiny OLMo-2, on CPU?

    python bench/generation.py [--repeats 3]

Model: OLMo-2 from config (hidden 192, intermediate 768, 4 layers, 4 heads, vocab 2048, random init,
``torch.manual_seed(0)``), 2 threads.

* generation: ``greedy_generate`` on 256 random prompts of 8-24 tokens, 12 new tokens, ``batch_size=64``
  (left padding + KV cache), against the same function one sequence at a time (``batch_size=1``) on the
  first 32 prompts, scaled per sequence. Goal: batched >= 5x the sequences/s of the one-at-a-time loop, with
  identical tokens.
* factors: ``collect_factors`` (sampled Fisher, expand mode, every ``model.layers.*.mlp.*_proj``,
  ``drop_last_position=True``) against a plain forward + mean next-token cross-entropy + backward of the
  same batches; real (unpadded) tokens per second of both and their ratio.

Each time is the median of ``--repeats`` runs after a short warm-up (the slow one-at-a-time loop: one run).
All numbers printed are measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from memcurve.curvature import FactorSettings, collect_factors, select_linear_layers
from memcurve.lightning_modules import CausalLMModule
from memcurve.metrics import greedy_generate

PAD = 0
NEW_TOKENS = 12
SEQUENTIAL_SUBSET = 32
FACTOR_BATCHES = 4


def build_model() -> CausalLMModule:
    """The demo's tiny OLMo-2 (configs/olmo2_tiny_canaries.yaml), untrained; its HF model is ``.model``."""
    torch.manual_seed(0)
    config = {
        "model_type": "olmo2",
        "vocab_size": 2048,
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "pad_token_id": PAD,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return CausalLMModule(config).eval()


def median_seconds(run: Callable[[], object], repeats: int, warm_up: Callable[[], object] | None = None) -> float:
    """Median wall time of ``repeats`` calls of ``run`` after one call of ``warm_up`` (default: ``run``)."""
    (warm_up or run)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_generation(module: CausalLMModule, repeats: int) -> None:
    model = module.model
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 25, (256,), generator=generator).tolist()
    prompts = [torch.randint(3, 2048, (n,), generator=generator).tolist() for n in lengths]
    subset = prompts[:SEQUENTIAL_SUBSET]
    outputs: dict[str, Tensor] = {}

    def batched() -> None:
        outputs["batched"] = greedy_generate(model, prompts, NEW_TOKENS, pad_token_id=PAD, batch_size=64)

    def one_at_a_time() -> None:
        outputs["sequential"] = greedy_generate(model, subset, NEW_TOKENS, pad_token_id=PAD, batch_size=1)

    def warm_up_one_at_a_time() -> None:
        greedy_generate(model, subset[:2], NEW_TOKENS, pad_token_id=PAD, batch_size=1)

    batched_rate = len(prompts) / median_seconds(batched, repeats)
    # the slow loop is timed once (after a short warm-up) to keep the bench short
    sequential_rate = len(subset) / median_seconds(one_at_a_time, 1, warm_up_one_at_a_time)
    ratio = batched_rate / sequential_rate
    identical = torch.equal(outputs["batched"][:SEQUENTIAL_SUBSET], outputs["sequential"])
    print(f"generation: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {NEW_TOKENS} new tokens")
    print(f"  batched (batch_size=64)     {batched_rate:9.1f} sequences/s")
    print(f"  one at a time (batch 1)     {sequential_rate:9.1f} sequences/s  (first {len(subset)} prompts)")
    print(f"  speed-up                    {ratio:9.2f}x  goal >= 5x: {'met' if ratio >= 5 else 'NOT met'}")
    print(f"  identical tokens            {identical}")


def bench_factors(model: CausalLMModule, repeats: int) -> None:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(FACTOR_BATCHES):
        ids = torch.randint(3, 2048, (16, 64), generator=generator)
        mask = torch.ones_like(ids)
        lengths = torch.randint(32, 65, (16,), generator=generator)
        mask[torch.arange(64)[None, :] >= lengths[:, None]] = 0  # right padding
        batches.append({"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask})
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    layers = select_linear_layers(model, ["model.model.layers.*.mlp.*_proj"])
    adapter = model.fisher_adapter()  # the causal-LM adapter the KFACFactors callback uses

    def factors(selected: list[dict[str, Tensor]]) -> None:
        settings = FactorSettings(drop_last_position=True)
        collect_factors(model, selected, layers, settings, adapter=adapter, reduce_across_ranks=False)

    def plain(selected: list[dict[str, Tensor]]) -> None:
        for batch in selected:
            logits = adapter.logits(model, batch)
            F.cross_entropy(logits.flatten(0, 1), adapter.labels(batch).flatten(), ignore_index=-100).backward()
            model.zero_grad(set_to_none=True)

    # warm-up on one batch each
    factor_rate = tokens / median_seconds(lambda: factors(batches), repeats, lambda: factors(batches[:1]))
    plain_rate = tokens / median_seconds(lambda: plain(batches), repeats, lambda: plain(batches[:1]))
    print(f"factors: {len(batches)} batches of 16 x 64 (right-padded) {tokens} real tokens, {len(layers)} MLP layers")
    print(f"  collect_factors             {factor_rate:9.0f} tokens/s")
    print(f"  plain forward + backward    {plain_rate:9.0f} tokens/s")
    print(f"  collect / plain time        {plain_rate / factor_rate:9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = build_model()
    parameters = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    print(f"tiny OLMo-2: {parameters / 1e6:.2f}M parameters, {threads} threads, torch {torch.__version__}")
    bench_generation(model, args.repeats)
    bench_factors(model, args.repeats)


if __name__ == "__main__":
    main()
