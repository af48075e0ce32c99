# `make demo` and `make test` install everything into .venv first (torch before the rest, so that pip never
# swaps the torch you chose for another build). TORCH picks the build: the default suits a CPU machine with
# a local torch 2.13.0 wheel; on a GPU machine use e.g. `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# LOCK=requirements.lock installs the versions the README's numbers were measured with (Python 3.11, Linux);
# empty (the default): the newest versions pyproject.toml allows, what `pip install` gives.
LOCK ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed$(if $(LOCK),-$(notdir $(LOCK)))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install lock demo train filter test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp names the lock, so that switching LOCK reinstalls.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	rm -f $(VENV)/.installed*
	touch $@

install: $(STAMP)

# Rewrites requirements.lock from .venv: every package but torch (TORCH picks that) and the project itself.
lock: install
	printf '%s\n' "# The versions behind the README's and BENCHMARKS.md's CPU numbers (Python 3.11, Linux x86_64)." \
	  "# make demo LOCK=requirements.lock installs them; make lock rewrites this file from .venv." > requirements.lock
	$(BIN)/pip freeze --exclude-editable --exclude torch --exclude phi1 >> requirements.lock

# The mini reproduction (README): Figure 2.1 in miniature, offline on a 2-core CPU in ~8.5 minutes. The quality
# filter on the standard library, six training runs ({tiny, tiny_wide} × {unfiltered, filtered, filtered →
# exercises}), each evaluated on HumanEval, then report.py draws outputs/report/mini_fig2_1.png.
demo: filter
	$(BIN)/python train.py +sweep=mini
	$(BIN)/python report.py

# The embedded default: one tiny model on the standard library (~3 minutes).
train: install
	$(BIN)/python train.py

# The quality filter (paper §2.1) on the standard library, offline: heuristic labels, MiniLM embeddings,
# random forest, filtered documents in data/filtered/ (~2 minutes on 2 cores).
filter: install
	$(BIN)/python prepare.py stage=annotate
	$(BIN)/python prepare.py stage=embed
	$(BIN)/python prepare.py stage=classify
	$(BIN)/python prepare.py stage=filter

test: install
	$(BIN)/python -m pytest -q

# Removes the caches any command rebuilds from its inputs (packed tokens, trained tokenizers). Never outputs/
# (trained runs: days of GPUs for phi-1-base) nor the rest of data/: the LLM's annotations, synthetic sets and
# answer cache are paid API calls (GPT-4 on the paper's 100K samples), and embeddings take a GPU to redo.
clean:
	rm -rf data/packed data/tokenizers wandb
