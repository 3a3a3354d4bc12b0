"""Layer-by-layer edits of a saved HF model and of a Lightning checkpoint: same weights as edit_state_dict, originals
untouched, output never the source, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from memcurve.cli import run
from memcurve.curvature import (
    FactorSettings,
    assign_owners,
    collect_factors,
    edit_state_dict,
    eigendecompose,
    load_factors,
    save_factors,
    save_sharded_factors,
)
from memcurve.editing import EDIT_KEY
from memcurve.editing.hf import EDIT_RECORD, edit_hf_model, edit_lightning_checkpoint, resolve_prefix
from memcurve.lightning_modules import CausalLMModule
from memcurve.tiny import TINY_OLMO2

FACTOR_LAYERS = [f"model.model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")]
EDITED = ["model.model.layers.*.mlp.gate_proj"]  # patterns in factor (LightningModule) names


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny OLMo-2 saved with save_pretrained, and its eigen factors as one file and as a 2-shard index."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    module = CausalLMModule(dict(TINY_OLMO2))
    module.model.save_pretrained(root / "source")
    g = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(2, 320, (4, 10), generator=g), "index": torch.arange(4) + 4 * i} for i in range(3)
    ]
    factor_settings = FactorSettings(drop_last_position=True)
    factors = collect_factors(
        module, DataLoader(batches, batch_size=None), FACTOR_LAYERS, factor_settings, adapter=module.fisher_adapter()
    )
    eigen = eigendecompose(factors)
    settings = {"mode": "expand", "position": "all", "bias": "exclude", "dtype": "float32", "drop_last_position": True}
    settings.update({"fisher": "sampled", "mc_samples": 1})
    single = save_factors(root / "kfac.safetensors", eigen, model=module, settings=settings)
    owners = assign_owners(dict.fromkeys(FACTOR_LAYERS, 1), 2)
    index = save_sharded_factors(root / "sharded", eigen, model=module, settings=settings, owners=owners)
    return root, module, single, index


@pytest.mark.parametrize("which", ["single", "index"])
def test_edited_hf_model_equals_edit_state_dict_and_leaves_the_source(setup, tmp_path, which):
    root, module, single, index = setup
    factors = single if which == "single" else index
    before = folder_digest(root / "source")
    record = edit_hf_model(root / "source", factors, EDITED, energy=0.6, output_dir=tmp_path / "out")
    assert folder_digest(root / "source") == before  # the original folder is untouched
    expected, edits = edit_state_dict(
        module.state_dict(), load_factors(single), [FACTOR_LAYERS[0], FACTOR_LAYERS[2]], energy=0.6
    )
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = load_file(str(root / "source" / "model.safetensors"))
    assert set(saved) == set(original)
    changed = set()
    for key, value in saved.items():
        if torch.equal(value, original[key]):
            continue
        changed.add(key)
        torch.testing.assert_close(value, expected[f"model.{key}"], rtol=0, atol=0)
    assert changed == {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate_proj.weight"}
    assert record["prefix"] == "model." and record["energy"] == 0.6 and record["keep_fraction"] is None
    assert record["kept_pairs"] == sum(e.kept_pairs for e in edits.values())
    assert json.loads((tmp_path / "out" / EDIT_RECORD).read_text())["layers"].keys() == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate_proj",
    }


def test_refusals_and_clear_errors(setup, tmp_path):
    root, _, single, index = setup
    with pytest.raises(ValueError, match=r"is the source itself; the original is never overwritten"):
        edit_hf_model(root / "source", single, EDITED, energy=0.6, output_dir=root / "source" / ".." / "source")
    with pytest.raises(ValueError, match=r"layers \['model.model.layers.0.self_attn.q_proj'\] have no factors in"):
        edit_hf_model(
            root / "source", index, ["model.layers.0.self_attn.q_proj"], energy=0.6, output_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()  # checked before anything is edited or written
    with pytest.raises(ValueError, match=r"give exactly one of energy or keep_fraction"):
        edit_hf_model(root / "source", index, EDITED, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"layer pattern 'nope.\*' matches no linear layer"):
        edit_hf_model(root / "source", index, ["nope.*"], keep_fraction=0.5, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"prefix='x.'"):
        resolve_prefix(FACTOR_LAYERS, ["model.layers.0.mlp.gate_proj"], "x.")
    assert resolve_prefix(["lm_head"], ["lm_head"], "auto") == ""


def test_lightning_checkpoint_edit_and_hf_export(setup, tmp_path):
    _, module, single, index = setup
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 3}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=r"is the source itself"):
        edit_lightning_checkpoint(ckpt, index, EDITED, keep_fraction=0.3, output=ckpt)
    record = run(
        [
            "edit",
            "--source",
            str(ckpt),
            "--factors",
            str(index),
            "--layers",
            f"[{', '.join(EDITED)}]",
            "--keep_fraction",
            "0.3",
            "--output",
            str(tmp_path / "edited.ckpt"),
            "--hf_output_dir",
            str(tmp_path / "hf"),
        ]
    )
    assert record["method"] == "kfac" and sorted(record["layers"]) == [FACTOR_LAYERS[0], FACTOR_LAYERS[2]]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    edited = torch.load(tmp_path / "edited.ckpt", weights_only=False)
    expected, _ = edit_state_dict(
        module.state_dict(), load_factors(single), [FACTOR_LAYERS[0], FACTOR_LAYERS[2]], keep_fraction=0.3
    )
    assert edited["epoch"] == 3 and edited[EDIT_KEY]["keep_fraction"] == 0.3 and edited[EDIT_KEY]["method"] == "kfac"
    for key, value in expected.items():
        assert torch.equal(edited["state_dict"][key], value), key
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[f"model.{key}"]), key
