"""Gradient unlearning baselines (GA, GradDiff, NPO, SimNPO, RMU) on a tiny OLMo-2 that memorized random sequences:
each raises the forget loss, keeps the retain loss bounded, changes only its layers and never its input; the first
step's objective is the paper's loss; the step count is one trajectory; through apply_edit with a step-count strength
on a canary LM's forget set; misconfiguration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from memcurve.editing import EDIT_METHODS, METHODS, EditRequest, apply_edit
from memcurve.editing.request import layers_id, requests_for
from memcurve.editing.unlearning import (
    UNLEARNING_METHODS,
    UnlearningSettings,
    control_vector,
    default_rmu_layer,
    unlearn,
)
from memcurve.lightning_modules import CausalLMModule
from memcurve.metrics import weights_fingerprint
from memcurve.tiny import TINY_OLMO2

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

MLP = [f"model.model.layers.{i}.mlp.{name}_proj" for i in range(2) for name in ("gate", "up")]
DOWN = [f"model.model.layers.{i}.mlp.down_proj" for i in range(2)]
LAYERS = {"ga": MLP, "graddiff": MLP, "npo": MLP, "simnpo": MLP, "rmu": DOWN}
LENGTH, PAD = 16, 1
UNIFORM = math.log(TINY_OLMO2["vocab_size"])  # 5.77 nats: the loss of a uniform guess
STEPS, LR = 10, 1e-2  # a tiny model trained at lr 1e-2 needs a large unlearning rate too


def batch(ids: torch.Tensor, lengths: list[int]) -> dict[str, torch.Tensor]:
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


@pytest.fixture(scope="module")
def memorized():
    """A tiny OLMo-2 that memorized 8 random sequences (the forget set) and learned a counting pattern (retain)."""
    generator = torch.Generator().manual_seed(0)
    forget_ids = torch.randint(2, 320, (8, LENGTH), generator=generator)
    forget = [batch(forget_ids[:4], [16, 16, 12, 9]), batch(forget_ids[4:], [16] * 4)]  # with padding
    starts = torch.randint(2, 320, (32,), generator=generator)
    retain_ids = 2 + (starts[:, None] - 2 + torch.arange(LENGTH)) % 318
    retain = [batch(retain_ids[i : i + 8], [16] * 8) for i in range(0, 32, 8)]
    torch.manual_seed(0)
    module = CausalLMModule(dict(TINY_OLMO2))
    optimizer = torch.optim.Adam(module.parameters(), 1e-2)
    for step in range(150):
        optimizer.zero_grad()
        module.balanced_subnet_loss((forget + retain)[step % 6]).backward()
        optimizer.step()
    module.zero_grad(set_to_none=True)
    assert mean_loss(module, forget) < 0.2 and mean_loss(module, retain) < 0.2
    return module, forget, retain


def mean_loss(module: CausalLMModule, batches) -> float:
    with torch.no_grad():
        return sum(float(module.balanced_subnet_loss(b)) for b in batches) / len(batches)


def loaded(module: CausalLMModule, state_dict) -> CausalLMModule:
    edited = copy.deepcopy(module)
    edited.load_state_dict(state_dict)
    return edited


def settings(method: str, **overrides) -> UnlearningSettings:
    return UnlearningSettings(**{"method": method, "steps": STEPS, "lr": LR, **overrides})


# -- what each method does ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", UNLEARNING_METHODS)
def test_each_method_forgets_keeps_retain_bounded_and_changes_only_its_layers(memorized, method):
    module, forget, retain = memorized
    fingerprint, flags = weights_fingerprint(module), {n: p.requires_grad for n, p in module.named_parameters()}
    mode = module.training
    original = module.state_dict()
    kept = {key: value.clone() for key, value in original.items()}
    result = unlearn(module, forget, retain, LAYERS[method], settings(method), state_dict=original)
    trained = [f"{name}.weight" for name in LAYERS[method]]
    assert result.parameters == trained and len(result.history) == STEPS
    assert set(result.history[0]) == {"step", "forget_loss", "retain_loss", "loss"}
    assert result.rmu_layer == ("model.model.layers.1" if method == "rmu" else None)
    # Only the trained weights are new tensors; every other entry is the original tensor itself.
    assert list(result.state_dict) == list(original)
    for key, value in result.state_dict.items():
        if key in trained:
            assert value.shape == original[key].shape and value.dtype == original[key].dtype
            assert not torch.equal(value, original[key]), key
        else:
            assert value is original[key], key
    # Nothing given was modified: the module's weights, flags and mode, the state dict's tensors.
    assert weights_fingerprint(module) == fingerprint and module.training == mode
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert all(torch.equal(original[key], kept[key]) for key in kept)
    edited = loaded(module, result.state_dict)
    before_forget, before_retain = mean_loss(module, forget), mean_loss(module, retain)
    after_forget, after_retain = mean_loss(edited, forget), mean_loss(edited, retain)
    assert after_forget > 1.5 * before_forget, (method, before_forget, after_forget)
    assert after_retain < 1.0 < UNIFORM, (method, before_retain, after_retain)  # bounded: far from a uniform guess


def sequence_nll(module: CausalLMModule, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item summed next-token loss and token count, by hand (padding excluded)."""
    with torch.no_grad():
        logits = module(b["input_ids"], b["attention_mask"]).double()
    mask = b["attention_mask"].bool()
    valid = mask[:, :-1] & mask[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
    nll = nll.view(valid.shape) * valid
    return nll.sum(1), valid.sum(1).double()


@pytest.mark.parametrize("method", UNLEARNING_METHODS)
def test_first_step_objective_is_the_papers_loss(memorized, method):
    module, forget, retain = memorized
    result = unlearn(module, forget, retain, LAYERS[method], settings(method, steps=1))
    hyper = result.hyperparameters
    forget_nll, forget_tokens = sequence_nll(module, forget[0])
    retain_nll, retain_tokens = sequence_nll(module, retain[0])
    forget_loss, retain_loss = forget_nll.sum() / forget_tokens.sum(), retain_nll.sum() / retain_tokens.sum()
    if method == "ga":
        expected = -forget_loss
    elif method == "graddiff":
        expected = -forget_loss + retain_loss
    elif method == "npo":  # the reference is the unedited model: log(π/π_ref) = 0 at the first step
        expected = hyper["gamma"] * 2.0 / hyper["beta"] * math.log(2.0) + hyper["alpha"] * retain_loss
    elif method == "simnpo":
        beta = hyper["beta"]
        simnpo = -2.0 / beta * F.logsigmoid(beta * (forget_nll / forget_tokens - hyper["delta"])).mean()
        expected = hyper["gamma"] * simnpo + hyper["alpha"] * retain_loss
    else:  # rmu: the retain activations are the reference's at the first step
        outputs = []
        block = module.get_submodule("model.model.layers.1")
        handle = block.register_forward_hook(
            lambda _, __, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        with torch.no_grad():
            module(forget[0]["input_ids"], forget[0]["attention_mask"])
        handle.remove()
        h = outputs[0].double()
        c = control_vector(h.shape[-1], hyper["steering_coeff"], 0).double()
        mask = forget[0]["attention_mask"].double()
        per_item = ((h - c).pow(2).mean(-1) * mask).sum(1) / mask.sum(1)
        expected = hyper["gamma"] * per_item.mean()
    assert result.history[0]["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert result.history[0]["forget_loss"] == pytest.approx(float(forget_loss), rel=1e-5)
    assert result.history[0]["retain_loss"] == pytest.approx(float(retain_loss), rel=1e-5)


def test_defaults_are_open_unlearnings():
    assert UnlearningSettings(method="npo").hyperparameters == {"beta": 0.1, "gamma": 1.0, "alpha": 1.0}
    assert UnlearningSettings(method="simnpo").hyperparameters == {
        "beta": 4.5,
        "delta": 0.0,
        "gamma": 0.125,
        "alpha": 1.0,
    }
    assert UnlearningSettings(method="rmu").hyperparameters == {"steering_coeff": 2.0, "gamma": 1.0, "alpha": 1.0}
    assert UnlearningSettings(method="ga", beta=0.3).hyperparameters == {}  # unused settings are ignored
    assert UnlearningSettings(method="npo", beta=0.3, alpha=0).hyperparameters["beta"] == 0.3
    vector = control_vector(32, 2.0, 0)
    assert vector.norm().item() == pytest.approx(2.0) and bool((vector >= 0).all())
    assert torch.equal(vector, control_vector(32, 2.0, 0)) and not torch.equal(vector, control_vector(32, 2.0, 1))


def test_the_step_count_is_one_trajectory(memorized):
    module, forget, retain = memorized
    short = unlearn(module, forget, retain, MLP, settings("npo", steps=3))
    again = unlearn(module, forget, retain, MLP, settings("npo", steps=3))
    longer = unlearn(module, forget, retain, MLP, settings("npo", steps=5))
    assert longer.history[:3] == short.history and again.history == short.history
    assert all(torch.equal(short.state_dict[k], again.state_dict[k]) for k in short.parameters)
    assert not torch.equal(short.state_dict[short.parameters[0]], longer.state_dict[short.parameters[0]])


def test_rmu_steers_one_block_and_trains_only_what_reaches_it(memorized):
    module, forget, retain = memorized
    assert default_rmu_layer(module, [DOWN[0], MLP[3]]) == "model.model.layers.1"
    assert default_rmu_layer(module, [DOWN[0]]) == "model.model.layers.0"
    result = unlearn(module, forget, retain, DOWN, settings("rmu", steps=3, rmu_layer="model.model.layers.0"))
    original = module.state_dict()
    assert result.rmu_layer == "model.model.layers.0"
    assert not torch.equal(result.state_dict[f"{DOWN[0]}.weight"], original[f"{DOWN[0]}.weight"])
    # Layer 1 comes after the steered block: no gradient reaches it, so its weight is unchanged.
    assert torch.equal(result.state_dict[f"{DOWN[1]}.weight"], original[f"{DOWN[1]}.weight"])


def test_runs_from_an_inference_mode_hook_and_from_another_state_dict(memorized):
    module, forget, retain = memorized
    start = {key: value.clone() for key, value in module.state_dict().items()}
    start[f"{MLP[0]}.weight"] += 0.01
    with torch.inference_mode():
        result = unlearn(module, forget, retain, MLP, settings("graddiff", steps=2), state_dict=start)
    untouched = f"{DOWN[0]}.weight"
    assert result.state_dict[untouched] is start[untouched]
    from_module = unlearn(module, forget, retain, MLP, settings("graddiff", steps=1))
    assert result.history[0]["forget_loss"] != from_module.history[0]["forget_loss"]  # it started from `start`


# -- misconfiguration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"method": "dpo"},
            r"method='dpo' is not supported; choose one of \('ga', 'graddiff', 'npo', 'simnpo', 'rmu'\)",
        ),
        ({"steps": 0}, "steps=0 must be a positive integer"),
        ({"steps": 2.0}, "steps=2.0 must be a positive integer"),
        ({"lr": 0}, r"lr=0 must be a finite number > 0"),
        ({"lr": float("inf")}, r"lr=inf must be a finite number > 0"),
        ({"beta": -1.0}, r"beta=-1.0 must be a finite number > 0 or None"),
        ({"gamma": float("nan")}, r"gamma=nan must be a finite number >= 0 or None"),
        ({"alpha": True}, r"alpha=True must be a finite number >= 0 or None"),
        ({"delta": "0"}, r"delta='0' must be a finite number or None"),
        ({"steering_coeff": 0}, r"steering_coeff=0 must be a finite number > 0 or None"),
        ({"rmu_layer": ""}, r"rmu_layer='' must be a module name"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm=0.0 must be a finite number > 0 or None"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1 must be a finite number >= 0"),
        ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
        ({"max_forget": 0}, r"max_forget=0 must be a positive integer or None"),
        ({"seed": -1}, "seed=-1 must be an integer >= 0"),
    ],
)
def test_bad_settings_fail_eagerly(overrides, match):
    with pytest.raises(ValueError, match=match):
        UnlearningSettings(**overrides)


def test_bad_inputs_fail_before_any_work(memorized):
    module, forget, retain = memorized
    with pytest.raises(ValueError, match=r"layer 'model.model.layers.0.mlp' is a Olmo2MLP, not a linear layer"):
        unlearn(module, forget, retain, ["model.model.layers.0.mlp"], settings("ga"))
    with pytest.raises(ValueError, match=r"layer 'nope' is not a module of the model; the model's linear layers"):
        unlearn(module, forget, retain, ["nope"], settings("ga"))
    with pytest.raises(ValueError, match=r"lists \['model.model.layers.0.mlp.gate_proj'\] more than once"):
        unlearn(module, forget, retain, [MLP[0], MLP[0]], settings("ga"))
    with pytest.raises(ValueError, match=r"layer_names=\[\] must be a non-empty list"):
        unlearn(module, forget, retain, [], settings("ga"))
    with pytest.raises(ValueError, match="forget_batches is empty"):
        unlearn(module, [], retain, MLP, settings("ga"))
    with pytest.raises(TypeError, match="retain_batches must be re-iterable"):
        unlearn(module, forget, iter(retain), MLP, settings("ga"))
    with pytest.raises(ValueError, match=r"rmu_layer='model\.blocks\.9' is not a module of CausalLMModule"):
        unlearn(module, forget, retain, DOWN, settings("rmu", rmu_layer="model.blocks.9"))
    with pytest.raises(TypeError, match="settings must be an UnlearningSettings"):
        unlearn(module, forget, retain, MLP, {"method": "ga"})
    with pytest.raises(ValueError, match=r"the state dict has no \['model.model.layers.0.mlp.gate_proj.weight'"):
        unlearn(module, forget, retain, MLP, settings("ga"), state_dict={"other": torch.zeros(1)})


# -- through apply_edit: the request's method and steps, the module's forget / retain data ------------------------
CANARY_DATA = {  # tests/test_canary_text_datamodule.py's small canary data: 4 canaries planted >= 16 times
    "corpus_fraction": 0.03,
    "vocab_size": 320,
    "canaries_per_level": 2,
    "block_size": 48,
    "val_fraction": 0.1,
    "batch_size": 8,
    "eval_batch_size": 16,
}
EDIT_SETTINGS = UnlearningSettings(lr=LR, batch_size=4, max_retain=16)


@pytest.fixture(scope="module")
def lm_with_canaries():
    from memcurve.data import CanaryTextDataModule

    datamodule = CanaryTextDataModule(**CANARY_DATA)
    datamodule.setup("fit")
    torch.manual_seed(0)
    return CausalLMModule(dict(TINY_OLMO2)), datamodule


@pytest.mark.parametrize("method", UNLEARNING_METHODS)
def test_apply_edit_runs_the_request_steps_on_the_modules_forget_set(lm_with_canaries, method):
    module, datamodule = lm_with_canaries
    original = {key: value.clone() for key, value in module.state_dict().items()}
    fingerprint = weights_fingerprint(module)
    request = EditRequest(method, LAYERS[method], steps=3)
    result = apply_edit(
        request, original, LAYERS[method], module=module, datamodule=datamodule, unlearning=EDIT_SETTINGS
    )
    assert list(result.layers) == LAYERS[method] and len(result.history) == 3
    for name, edit in result.layers.items():
        key = f"{name}.weight"
        assert edit.method == method and edit.kept_pairs == edit.total_pairs == original[key].numel()
        assert edit.weight is result.state_dict[key] and edit.change_norm > 0 and edit.weight_norm > 0
        assert edit.change_norm == pytest.approx(float((result.state_dict[key] - original[key]).double().norm()))
    trained = {f"{name}.weight" for name in LAYERS[method]}
    assert all(value is original[key] for key, value in result.state_dict.items() if key not in trained)
    assert weights_fingerprint(module) == fingerprint
    # The strength is a point on one trajectory: fewer steps are the first steps of more.
    two = EditRequest(method, LAYERS[method], steps=2)
    shorter = apply_edit(two, original, LAYERS[method], module=module, datamodule=datamodule, unlearning=EDIT_SETTINGS)
    assert shorter.history == result.history[:2]


def test_the_request_sets_method_and_steps_and_the_settings_the_rest(lm_with_canaries):
    module, datamodule = lm_with_canaries
    request = EditRequest("graddiff", MLP, steps=2)
    settings = UnlearningSettings(method="rmu", steps=50, lr=LR, batch_size=4, max_retain=16, alpha=0.5)
    result = apply_edit(request, module.state_dict(), MLP, module=module, datamodule=datamodule, unlearning=settings)
    assert len(result.history) == 2
    first = result.history[0]
    assert first["loss"] == pytest.approx(-first["forget_loss"] + 0.5 * first["retain_loss"], rel=1e-6)


def test_edit_requests_take_steps_for_the_unlearning_methods():
    request = EditRequest("npo", MLP, steps=20)
    assert request.strength == ("steps", 20) and request.setting == "steps 20"
    assert request.tag == f"npo-s20-L{layers_id(tuple(MLP))}" and request.step == 20_000_000
    assert set(EDIT_METHODS) == set(METHODS) | set(UNLEARNING_METHODS)
    assert requests_for("rmu", DOWN, steps=[5, 10]) == [
        EditRequest("rmu", DOWN, steps=5),
        EditRequest("rmu", DOWN, steps=10),
    ]
    with pytest.raises(ValueError, match=r"method='npo' takes steps .*; got energy=0.5, .* steps=None"):
        EditRequest("npo", MLP, energy=0.5)
    with pytest.raises(ValueError, match=r"method='ga' takes steps .*; got .*ratio=0.1, steps=3"):
        EditRequest("ga", MLP, ratio=0.1, steps=3)
    with pytest.raises(ValueError, match="steps=0 must be a positive integer"):
        EditRequest("simnpo", MLP, steps=0)
    with pytest.raises(ValueError, match=r"steps=5 is the strength of the gradient unlearning methods .*; kfac takes"):
        EditRequest("kfac", MLP, energy=0.5, steps=5)
    with pytest.raises(ValueError, match=r"steps=5 is the strength .*; bsn takes ratio"):
        EditRequest("bsn", MLP, steps=5)
    with pytest.raises(ValueError, match="method='npo' needs at least one steps value"):
        requests_for("npo", MLP)


def test_apply_edit_refuses_a_module_without_forget_data(lm_with_canaries):
    module, datamodule = lm_with_canaries
    request = EditRequest("ga", MLP, steps=1)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"method 'ga' needs Sequential.balanced_subnet_data: the module must give"):
        apply_edit(request, plain.state_dict(), ["0"], module=plain, datamodule=datamodule)
    with pytest.raises(ValueError, match="method 'ga' needs the datamodule"):
        apply_edit(request, module.state_dict(), MLP, module=module, datamodule=None)
