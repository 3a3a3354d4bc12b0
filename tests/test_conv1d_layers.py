"""transformers ``Conv1D`` (GPT-2's linear layer, weight stored as [in, out]) is a first-class K-FAC linear layer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from memcurve.adapters import ClassificationAdapter
from memcurve.curvature import (
    FactorSettings,
    collect_factors,
    edit_state_dict,
    eigendecompose,
    load_factors,
    save_factors,
    select_linear_layers,
)
from memcurve.curvature.factor_file import METADATA_KEY
from memcurve.curvature.layers import as_out_in, from_out_in, is_linear, linear_shape, weight_layout

D_IN, D_HID, D_OUT = 6, 8, 5
NAMES = ["fc1", "fc2", "head"]  # fc2 is square (8 -> 8): its layout cannot be read from the shape


class Conv1DNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = Conv1D(D_HID, D_IN)  # Conv1D(nf=out, nx=in)
        self.fc2 = Conv1D(D_HID, D_HID)
        self.head = Conv1D(D_OUT, D_HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class LinearNet(nn.Module):
    def __init__(self, source: Conv1DNet) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_HID)
        self.fc2 = nn.Linear(D_HID, D_HID)
        self.head = nn.Linear(D_HID, D_OUT)
        self.to(source.fc1.weight.dtype)  # before copying, so that no weight is rounded
        with torch.no_grad():
            for name in NAMES:
                getattr(self, name).weight.copy_(getattr(source, name).weight.T)
                getattr(self, name).bias.copy_(getattr(source, name).bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _nets() -> tuple[Conv1DNet, LinearNet]:
    torch.manual_seed(0)
    conv = Conv1DNet().double()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_(0, 0.5)
    return conv, LinearNet(conv)


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randn(4, 3, D_IN, generator=generator, dtype=torch.float64),
            "label": torch.randint(0, D_OUT, (4, 3), generator=generator),
            "index": torch.arange(4) + 4 * i,
        }
        for i in range(3)
    ]


def _factors(model: nn.Module, bias: str = "exclude") -> dict:
    settings = FactorSettings(fisher="empirical", dtype="float64", bias=bias)
    return collect_factors(
        model, _batches(), NAMES, settings, adapter=ClassificationAdapter(), reduce_across_ranks=False
    )


SETTINGS = {"fisher": "empirical", "mc_samples": 1, "mode": "expand", "position": "all"}


def test_layer_helpers() -> None:
    conv, linear = Conv1D(3, 7), nn.Linear(7, 3)
    assert is_linear(conv) and is_linear(linear) and not is_linear(nn.Tanh())
    assert linear_shape(conv) == linear_shape(linear) == (7, 3)
    assert (weight_layout(conv), weight_layout(linear)) == ("in_out", "out_in")
    w = torch.randn(3, 7)
    assert torch.equal(as_out_in(w.T, "in_out"), w) and torch.equal(from_out_in(w, "in_out"), w.T)
    with pytest.raises(TypeError, match="not a linear layer"):
        linear_shape(nn.Tanh())


def test_selection_matches_conv1d() -> None:
    conv, _ = _nets()
    assert select_linear_layers(conv, ["*"]) == NAMES


@pytest.mark.parametrize("bias", ["exclude", "homogeneous"])
def test_factors_equal_the_transposed_linear_net(bias: str) -> None:
    conv, linear = _nets()
    x = _batches()[0]["image"]
    torch.testing.assert_close(conv(x), linear(x))
    f_conv, f_lin = _factors(conv, bias), _factors(linear, bias)
    for name in NAMES:
        torch.testing.assert_close(f_conv[name].A, f_lin[name].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f_conv[name].G, f_lin[name].G, rtol=1e-12, atol=1e-12)
        assert f_conv[name].A.shape[0] == linear_shape(getattr(conv, name))[0] + (bias == "homogeneous")


@pytest.mark.parametrize("bias", ["exclude", "homogeneous"])
def test_edit_state_dict_is_the_transposed_linear_edit(tmp_path, bias: str) -> None:
    conv, linear = _nets()
    settings = {**SETTINGS, "bias": bias, "dtype": "float64", "drop_last_position": False}
    conv_file = save_factors(
        tmp_path / "conv.safetensors", eigendecompose(_factors(conv, bias)), model=conv, settings=settings
    )
    lin_file = save_factors(
        tmp_path / "lin.safetensors", eigendecompose(_factors(linear, bias)), model=linear, settings=settings
    )
    stored_conv, stored_lin = load_factors(conv_file, conv), load_factors(lin_file, linear)
    assert stored_conv.weight_layouts() == dict.fromkeys(NAMES, "in_out")
    assert stored_lin.weight_layouts() == dict.fromkeys(NAMES, "out_in")

    conv_sd, conv_edits = edit_state_dict(conv.state_dict(), stored_conv, NAMES, method="kronecker", energy=0.6)
    lin_sd, lin_edits = edit_state_dict(linear.state_dict(), stored_lin, NAMES, method="kronecker", energy=0.6)
    for name in NAMES:
        assert conv_sd[f"{name}.weight"].shape == conv.state_dict()[f"{name}.weight"].shape
        torch.testing.assert_close(conv_sd[f"{name}.weight"], lin_sd[f"{name}.weight"].T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv_sd[f"{name}.bias"], lin_sd[f"{name}.bias"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(conv_edits[name].weight, conv_sd[f"{name}.weight"])  # in the stored layout
        assert conv_edits[name].kept_pairs == lin_edits[name].kept_pairs
        assert conv_edits[name].change_norm == pytest.approx(lin_edits[name].change_norm)
        assert not torch.allclose(conv_sd[f"{name}.weight"], conv.state_dict()[f"{name}.weight"])

    # A plain mapping of LayerEigen carries no layout: the square layer must be told, else it is edited wrongly.
    eigen = dict(stored_conv.layers)
    told, _ = edit_state_dict(conv.state_dict(), eigen, ["fc2"], energy=0.6, weight_layout={"fc2": "in_out"})
    torch.testing.assert_close(told["fc2.weight"], conv_sd["fc2.weight"])
    untold, _ = edit_state_dict(conv.state_dict(), eigen, ["fc2"], energy=0.6)
    assert not torch.allclose(untold["fc2.weight"], conv_sd["fc2.weight"])
    with pytest.raises(ValueError, match="records 'in_out'"):
        edit_state_dict(conv.state_dict(), stored_conv, ["fc2"], energy=0.6, weight_layout={"fc2": "out_in"})
    with pytest.raises(ValueError, match="weight_layout 'in_out'"):  # non-square: the shapes refuse it
        edit_state_dict(conv.state_dict(), eigen, ["fc1"], energy=0.6)


def test_factor_file_records_weight_layout(tmp_path) -> None:
    conv, _ = _nets()
    settings = {**SETTINGS, "bias": "exclude", "dtype": "float64", "drop_last_position": False}
    path = save_factors(tmp_path / "f.safetensors", _factors(conv), model=conv, settings=settings)
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
    assert {name: info["weight_layout"] for name, info in meta["layers"].items()} == dict.fromkeys(NAMES, "in_out")
    assert meta["layers"]["fc1"]["in_features"] == D_IN and meta["layers"]["fc1"]["out_features"] == D_HID
    stored = load_factors(path, conv)
    assert stored.weight_layouts() == dict.fromkeys(NAMES, "in_out")
    for name, factors in _factors(conv).items():
        torch.testing.assert_close(stored.layers[name].A, factors.A)
    # the same parameter names and shapes, but nn.Linear layers: the layout mismatch is caught
    swapped = nn.Module()
    swapped.fc1, swapped.fc2, swapped.head = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_HID), nn.Linear(D_HID, D_OUT)
    from memcurve.curvature.storage import FactorFileError

    with pytest.raises(FactorFileError, match="weight layout 'out_in' in the model, 'in_out' in the file"):
        load_factors(path, swapped)


def test_gpt2_causal_lm_end_to_end(tmp_path) -> None:
    from memcurve.lightning_modules.causal_lm import CausalLMModule

    torch.manual_seed(0)
    module = CausalLMModule(
        {
            "model_type": "gpt2",
            "vocab_size": 320,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 128,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
        }
    )
    names = select_linear_layers(module, ["model.transformer.h.*.mlp.c_fc", "model.transformer.h.*.mlp.c_proj"])
    assert names == [f"model.transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for i in range(2):
        mask = torch.ones(3, 16, dtype=torch.long)
        mask[0, 12:] = 0
        ids = torch.randint(2, 320, (3, 16), generator=generator).masked_fill(mask == 0, 1)
        batches.append({"input_ids": ids, "attention_mask": mask, "index": torch.arange(3) + 3 * i})
    settings = FactorSettings(fisher="empirical", drop_last_position=True)
    factors = collect_factors(
        module, batches, names, settings, adapter=module.fisher_adapter(), reduce_across_ranks=False
    )
    assert factors[names[0]].A.shape == (32, 32) and factors[names[0]].G.shape == (128, 128)
    settings = {**SETTINGS, "bias": "exclude", "dtype": "float32", "drop_last_position": True}
    path = save_factors(tmp_path / "gpt2.safetensors", eigendecompose(factors), model=module, settings=settings)
    stored = load_factors(path, module)
    assert stored.weight_layouts() == dict.fromkeys(names, "in_out")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    edited, results = edit_state_dict(module.state_dict(), stored, names, method="kronecker", energy=0.6)
    module.load_state_dict(edited)
    for name in names:
        assert module.state_dict()[f"{name}.weight"].shape == before[f"{name}.weight"].shape
        assert not torch.allclose(module.state_dict()[f"{name}.weight"], before[f"{name}.weight"])
        assert 0 < results[name].relative_change < 1
    untouched = [k for k in before if not any(k.startswith(n + ".") for n in names)]
    assert all(torch.equal(module.state_dict()[k], before[k]) for k in untouched)
    logits = module(batches[0]["input_ids"], batches[0]["attention_mask"])
    assert torch.isfinite(logits).all()


def test_sharded_factor_index_records_weight_layout(tmp_path) -> None:
    from memcurve.curvature import save_sharded_factors

    conv, _ = _nets()
    settings = {**SETTINGS, "bias": "homogeneous", "dtype": "float64", "drop_last_position": False}
    eigen = eigendecompose(_factors(conv, "homogeneous"))
    index = save_sharded_factors(tmp_path, eigen, model=conv, settings=settings, owners={"fc1": 0, "fc2": 1, "head": 1})
    stored = load_factors(index, conv)
    assert stored.weight_layouts() == dict.fromkeys(NAMES, "in_out")
    edited, _ = edit_state_dict(conv.state_dict(), stored, NAMES, energy=0.6)
    reference, _ = edit_state_dict(conv.state_dict(), eigen, NAMES, energy=0.6, weight_layout=stored.weight_layouts())
    for name in NAMES:
        torch.testing.assert_close(edited[f"{name}.weight"], reference[f"{name}.weight"])
