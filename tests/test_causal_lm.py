"""CausalLMModule: building HF causal LMs, the K-FAC adapter, fit + evaluation, the nDCG reference guard, and the
curvature callbacks (factors, probe, pruning) on a tiny OLMo-2 trained on canary text."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch

from memcurve.callbacks import BandActivationProbe, KFACFactors, KFACPruning
from memcurve.curvature import FactorSettings, collect_factors, select_linear_layers
from memcurve.data import CanaryTextDataModule
from memcurve.editing import report_markdown
from memcurve.lightning_modules import CausalLMFisherAdapter, CausalLMModule, build_causal_lm


def tiny_config(model_type: str = "olmo2", vocab_size: int = 320, positions: int = 128) -> dict:
    config = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    }
    if model_type == "gpt2":
        return config | {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": positions}
    return config | {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": positions,
    }


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> CanaryTextDataModule:
    dm = CanaryTextDataModule(
        corpus_fraction=0.02,
        canaries_per_level=2,
        duplicate_levels=(0, 1, 16),
        vocab_size=320,
        block_size=32,
        prefix_length=4,
        suffix_length=6,
        batch_size=8,
        eval_batch_size=16,
        log_dir=str(tmp_path_factory.mktemp("canary_log")),
    )
    dm.setup("fit")
    return dm


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="lm"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    return pl.Trainer(**(settings | kwargs))


@pytest.mark.parametrize("model_type", ["olmo2", "llama", "gpt2"])
def test_builds_hf_causal_lms_from_config(model_type):
    model = build_causal_lm(tiny_config(model_type))
    logits = model(input_ids=torch.randint(2, 320, (2, 7))).logits
    assert logits.shape == (2, 7, 320)


def test_build_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="needs 'model_type'"):
        build_causal_lm({"hidden_size": 32})
    with pytest.raises(ValueError, match="model_type='no-such-model'"):
        build_causal_lm({"model_type": "no-such-model"})
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        build_causal_lm(str(tmp_path / "missing_model"))
    with pytest.raises(OSError, match="neither a local model folder nor a hub id"):
        build_causal_lm("memcurve-tests/no-such-model")  # HF_HUB_OFFLINE=1 in conftest: fails fast
    with pytest.raises(ValueError, match="dtype='float8'"):
        build_causal_lm(tiny_config(), dtype="float8")


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="memorized_set='all'"):
        CausalLMModule(tiny_config(), memorized_set="all")
    with pytest.raises(ValueError, match=r"warmup_fraction=1\.5"):
        CausalLMModule(tiny_config(), warmup_fraction=1.5)
    with pytest.raises(ValueError, match="memorized_min_level=0"):
        CausalLMModule(tiny_config(), memorized_min_level=0)
    with pytest.raises(ValueError, match=r"prefix_shifts=\[0\] must be a list of integers >= 1"):
        CausalLMModule(tiny_config(), prefix_shifts=[0])


def test_tokenizer_larger_than_embedding_is_an_error(datamodule):
    module = CausalLMModule(tiny_config(vocab_size=256))
    with pytest.raises(ValueError, match=r"tokenizer has 320 tokens but the model's embedding has 256 rows"):
        module.check_compatible(datamodule)


def test_prefix_longer_than_the_model_context_is_an_error(datamodule):
    module = CausalLMModule(tiny_config(positions=3))
    with pytest.raises(ValueError, match=r"prefix_length=4 exceeds the model's max_position_embeddings=3"):
        module.check_compatible(datamodule)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_fisher_adapter_ignores_padding_and_the_last_position(fisher):
    """Factors of a right-padded batch equal those of its sequences run one by one without padding."""
    torch.manual_seed(0)
    module = CausalLMModule(tiny_config()).double()
    layers = select_linear_layers(module, ["model.model.layers.*.mlp.*_proj"])
    long, short = torch.randint(2, 320, (10,)), torch.randint(2, 320, (6,))
    padded = {
        "input_ids": torch.stack([long, torch.cat([short, torch.ones(4, dtype=torch.long)])]),
        "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4]),
        "index": torch.tensor([0, 1]),
    }
    alone = [
        {"input_ids": long[None], "attention_mask": torch.ones(1, 10, dtype=torch.long), "index": torch.tensor([0])},
        {"input_ids": short[None], "attention_mask": torch.ones(1, 6, dtype=torch.long), "index": torch.tensor([1])},
    ]
    adapter = module.fisher_adapter()
    assert adapter.drop_last_position
    settings = FactorSettings(fisher=fisher, drop_last_position=True, dtype="float64")
    together = collect_factors(module, [padded], layers, settings, adapter=adapter)
    separate = collect_factors(module, alone, layers, settings, adapter=adapter)
    for name in layers:
        assert together[name].count_A == separate[name].count_A == 9 + 5
        torch.testing.assert_close(together[name].A, separate[name].A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together[name].G, separate[name].G, rtol=1e-9, atol=1e-12)


def test_adapter_labels_are_the_next_tokens():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    adapter = CausalLMFisherAdapter()
    assert adapter.labels(batch).tolist() == [[6, 7, -100, -100]]
    assert adapter.loss_mask(batch).tolist() == [[True, True, False, False]]


def test_fit_then_evaluate_with_a_cached_unedited_reference(datamodule, tmp_path):
    module = CausalLMModule(tiny_config(), ndcg_max_batches=2)
    trainer(tmp_path).fit(module, datamodule=datamodule)
    logged = trainer_metrics = module.trainer.callback_metrics
    assert {"val/perplexity", "mem/strict", "control/strict", "canary/dup16/strict"} <= set(trainer_metrics)
    assert torch.isfinite(logged["val/perplexity"])

    before = module.evaluation_metrics(datamodule)
    assert before["val/ndcg@10"] == 1.0  # the unedited weights are the reference
    assert before["mem/count"] == 2 and 0.0 <= before["mem/strict"] <= 1.0
    assert before["val/perplexity"] > 1.0
    assert {f"shift/k{k}/strict" for k in (1, 2, 4)} <= set(before)  # prompts are EOS + 4 tokens

    with torch.no_grad():  # an edit: the reference must stay the unedited model's
        for name, parameter in module.model.named_parameters():
            if ".mlp." in name:
                parameter.mul_(0.2)
    after = module.evaluation_metrics(datamodule)
    assert after["val/ndcg@10"] < 0.99, "an edited model must not be scored against itself"
    module.reset_reference()  # the paper code's mistake, done on purpose: the edited model as its own reference
    assert module.evaluation_metrics(datamodule)["val/ndcg@10"] == 1.0


def test_curvature_callbacks_run_on_the_lm(datamodule, tmp_path):
    layers = ["model.model.layers.*.mlp.gate_proj", "model.model.layers.*.mlp.up_proj"]
    callbacks = [
        KFACFactors(layers=layers, settings=FactorSettings(max_samples=32), when="fit_end"),
        BandActivationProbe(factors="latest", when="fit_end"),
        KFACPruning(layers=layers, energy=[0.5], when="fit_end"),
    ]
    module = CausalLMModule(tiny_config(), ndcg_max_batches=2)
    trainer(tmp_path, callbacks).fit(module, datamodule=datamodule)
    factors, probe, pruning = callbacks
    assert factors.pass_settings.drop_last_position  # taken from the causal-LM adapter
    rows = pruning.rows
    assert len(rows) == 1 and rows[0].before["val/ndcg@10"] == 1.0 and rows[0].after["val/ndcg@10"] < 1.0
    assert {"mem/strict", "mem/avg_levenshtein", "val/perplexity", "canary/dup0/strict"} <= set(rows[0].after)
    with open(probe.saved_paths[-1]) as handle:
        groups = {row["group"] for row in csv.DictReader(handle)}
    assert groups == {"memorized", "control", "val"}
    (title, columns), (mia_title, mia), *others = module.report_tables(rows)  # beside the main table
    levels = [(f"canary/dup{n}/{kind}", f"dup{n} {kind}") for kind in ("strict", "loose") for n in (0, 1, 16)]
    assert not others and title == "canary recall per duplicate level" and columns == levels
    assert mia_title.startswith("membership AUROC") and mia == [
        ("mia/dup1/auroc_mink", "dup1"),
        ("mia/dup16/auroc_mink", "dup16"),
    ]
    overall, extra = report_markdown(rows, module).split(f"\n\n{title}:\n")
    extra, membership = extra.split(f"\n\n{mia_title}:\n")
    assert membership.splitlines()[0] == "| layers | method | setting | kept | rel. change | dup1 | dup16 |"
    present = {key for row in rows for key in row.after}  # the oracle's columns only with an oracle
    headers = " | ".join(header for key, header in CausalLMModule.report_metrics if key in present)
    assert overall.splitlines()[0] == f"| layers | method | setting | kept | rel. change | {headers} |"
    headers = " | ".join(header for _, header in levels)
    assert extra.splitlines()[0] == f"| layers | method | setting | kept | rel. change | {headers} |"
    assert extra.splitlines()[2].startswith("| – | unedited |") and "| kfac | energy 0.5 |" in extra.splitlines()[3]
    assert len(extra.splitlines()) == 2 + 1 + 1  # header, rule, unedited, the one edit


def test_mined_memorized_set_comes_from_the_reference(datamodule):
    module = CausalLMModule(tiny_config(), memorized_set="mined")
    examples = datamodule.canary_examples()
    mined = module.memorized_canaries(datamodule)
    assert mined.dtype == torch.bool and mined.shape == examples["levels"].shape
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.add_(torch.randn_like(parameter))
    torch.testing.assert_close(module.memorized_canaries(datamodule), mined)  # cached from the unedited weights


def test_cli_fit_then_compare_every_method_on_the_lm(tmp_path, monkeypatch, capsys):
    """``memcurve fit`` on the canary config (tiny settings), then ``memcurve compare`` with K-FAC, SVD and
    BalancedSubnet on its checkpoint: one table with the LM columns and a row per method."""
    import json
    from pathlib import Path

    import yaml

    from memcurve.cli import run

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "olmo2_tiny_canaries.yaml").read_text())
    config["trainer"]["callbacks"] = [
        callback
        for callback in config["trainer"]["callbacks"]
        if callback["class_path"].endswith(("KFACFactors", "ModelCheckpoint"))
    ]
    config["trainer"] |= {"max_epochs": 1, "limit_train_batches": 4, "enable_progress_bar": False}
    config["model"]["init_args"] |= {"model": tiny_config(), "ndcg_max_batches": 1}
    config["data"]["init_args"] |= dict(
        corpus_fraction=0.02, canaries_per_level=2, duplicate_levels=[0, 1, 16], vocab_size=320, block_size=32,
        prefix_length=4, suffix_length=6, batch_size=8,
    )  # fmt: skip
    path = tmp_path / "tiny_canaries.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(path)])
    assert "canary recall per duplicate level" not in capsys.readouterr().out  # no pruning callback in this run
    run_dir = tmp_path / "runs" / "olmo2_tiny_canaries" / "version_0"
    assert json.loads((run_dir / "canaries.json").read_text())["canaries"]
    layers = "[model.model.layers.*.mlp.gate_proj, model.model.layers.*.mlp.up_proj]"
    edits = (
        f"[{{method: kfac, layers: {layers}, energy: [0.6]}}, {{method: svd, layers: {layers}, energy: [0.6]}}, "
        f"{{method: bsn, layers: {layers}, ratio: [0.01]}}]"
    )
    rows = run(
        ["compare", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
         "--factors", str(run_dir / "kfac" / "kfac-final.safetensors"), "--edits", edits, "--bsn.epochs", "1",
         "--bsn.max_retain", "16", "--output_dir", str(tmp_path / "comparison")]
    )  # fmt: skip
    assert [row.method for row in rows] == ["kfac", "svd", "bsn"]
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "strict" in table and "nDCG@10" in table and "ppl" in table
    assert "canary recall per duplicate level" in table
    assert all(row.after["val/ndcg@10"] < 1.0 for row in rows)


def test_balanced_subnet_needs_memorized_canaries(datamodule):
    module = CausalLMModule(tiny_config(), memorized_min_level=64)  # no canary has 64 copies here
    with pytest.raises(ValueError, match="no canary is memorized"):
        module.balanced_subnet_data(datamodule, batch_size=4)
    forget, retain = CausalLMModule(tiny_config()).balanced_subnet_data(datamodule, batch_size=4, max_retain=8)
    assert len(forget.dataset) == 2 and len(retain.dataset) == 8  # the level-16 canaries; 8 background windows


def test_gpt2_with_tied_embeddings_is_scored_against_its_unedited_reference(datamodule):
    """GPT-2 ties lm_head to the token embedding and keeps its MLPs in Conv1D layers: the reference forward
    (functional_call over every tied name) and the metrics work the same."""
    module = CausalLMModule(tiny_config("gpt2"), ndcg_max_batches=1)
    assert module.evaluation_metrics(datamodule)["val/ndcg@10"] == 1.0
    with torch.no_grad():
        module.model.transformer.h[0].mlp.c_fc.weight.mul_(0.1)
    assert module.evaluation_metrics(datamodule)["val/ndcg@10"] < 1.0
    assert len(select_linear_layers(module, ["model.transformer.h.*.mlp.c_fc"])) == 2


def test_membership_inference_per_level_and_the_distance_to_an_oracle(datamodule, tmp_path):
    from sklearn.metrics import roc_auc_score

    from memcurve.metrics.unlearning import sequence_scores

    module = CausalLMModule(tiny_config(), ndcg_max_batches=1)
    trainer(tmp_path).fit(module, datamodule=datamodule)
    module.eval()
    metrics = module.membership_metrics(datamodule)
    examples = datamodule.canary_examples()
    scores = sequence_scores(
        module.model, examples["prefixes"], examples["suffixes"], pad_token_id=datamodule.pad_token_id, k=0.4
    )
    levels = examples["levels"]
    for name, mask in (("dup1", levels == 1), ("dup16", levels == 16), ("mem", levels >= 16)):
        rows = mask | (levels == 0)
        member = mask[rows].numpy()
        assert metrics[f"mia/{name}/auroc_loss"] == pytest.approx(
            roc_auc_score(member, -scores["loss"][rows]), abs=1e-6
        )
        assert metrics[f"mia/{name}/auroc_mink"] == pytest.approx(
            roc_auc_score(member, scores["min_k"][rows]), abs=1e-6
        )
        assert metrics[f"mia/{name}/nll"] == pytest.approx(float(scores["normalized_log_likelihood"][mask].mean()))
    assert not any(key.startswith("oracle/") for key in metrics)

    # The oracle: its own weights are at distance zero; a checkpoint path is read at the first evaluation.
    module.set_oracle(module.state_dict())
    same = module.membership_metrics(datamodule)
    assert same["oracle/ks"] == 0.0 and same["oracle/forget_quality"] == 1.0 and same["oracle/privleak"] == 0.0
    other = CausalLMModule(tiny_config())  # untrained: a different model
    path = tmp_path / "oracle.ckpt"
    torch.save({"state_dict": other.state_dict()}, path)
    with pytest.raises(FileNotFoundError, match=r"oracle_checkpoint='.*missing\.ckpt' is not a file"):
        CausalLMModule(tiny_config(), oracle_checkpoint=str(tmp_path / "missing.ckpt")).setup("validate")
    from_path = CausalLMModule(tiny_config(), oracle_checkpoint=str(path))
    from_path.load_state_dict(module.state_dict())
    from_path.eval()
    module.set_oracle(other.state_dict())
    want, got = module.membership_metrics(datamodule), from_path.membership_metrics(datamodule)
    assert got == pytest.approx(want, nan_ok=True) and want["oracle/ks"] > 0  # privleak: NaN when the oracle AUROC is 1


def test_controls_leave_out_canaries_in_the_memorized_set(datamodule, monkeypatch):
    """With memorized_set="mined" a never-planted canary the reference recites is memorized, not a control."""
    module = CausalLMModule(tiny_config())
    levels = datamodule.canary_examples()["levels"]
    mined = levels >= 16
    first_control = int((levels == 0).nonzero()[0])
    mined[first_control] = True
    monkeypatch.setattr(module, "memorized_canaries", lambda datamodule, examples=None: mined)
    scores = module.canary_recall(datamodule)
    assert scores["control/count"] == int((levels == 0).sum()) - 1
    assert scores["mem/count"] == int(mined.sum())
