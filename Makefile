# sdtune: `make demo` and `make test` each work on a fresh clone (both build .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to a CPU build here so that a bare install does not pull a multi-GB CUDA build;
# on a GPU machine install the torch you need first, then `pip install -e .`.
TORCH ?= torch==2.13.0
DEMO := .cache/demo

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@# the browser test of `sdtune ui` (tests/test_ui_browser.py) drives Debian's chromium through Playwright;
	@# without it (no apt, not root) that test is skipped and says why
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    apt-get update -q && apt-get install -y -q chromium; } || \
	    echo "chromium not installed (needs apt-get as root): tests/test_ui_browser.py will be skipped"
	touch $@

demo: install
	rm -rf runs/demo .cache/demo
	$(BIN)/sdtune micro model $(DEMO)/micro-model
	$(BIN)/sdtune micro subject $(DEMO)/subject_photos --n 8
	$(BIN)/sdtune prep $(DEMO)/subject_photos $(DEMO)/subject --resolution 64 --caption-from txt --workers 1
	@# sks is the classic identifier and a known word (a rifle): check-token says so and exits 1; the micro
	@# model never saw it, so the demo keeps it. For a real model pick one from `sdtune suggest-tokens`.
	$(BIN)/sdtune check-token sks || true
	$(BIN)/sdtune train recipes/micro_dreambooth.yaml
	$(BIN)/sdtune sample runs/demo --seeds 0,1,2,3 --lora-scale 0,1 --guidance 4 --steps 20 --batch-size 4 \
	    --prompt "a photo of sks toy on a green background" \
	    --prompt "a photo of sks toy on a red floor in front of a blue wall" \
	    --prompt "a photo of sks toy right of a yellow star on a white background" \
	    --prompt "a photo of a toy" --out runs/demo/grid.png
	$(BIN)/sdtune eval runs/demo --metrics world --checkpoints all --lora-scale 0,1 --batch-size 4
	@echo
	@echo "runs/demo/grid.png: rows 'LoRA x0' are the pretrained micro model, rows 'LoRA x1' the same seeds with the"
	@echo "trained LoRA: the subject toy (purple body, orange hat, white eyes) appears in contexts its 8 photos never"
	@echo "showed, while 'a photo of a toy' still draws other toys (prior preservation)."
	@echo "runs/demo/eval/report.md: subject fidelity, context and class drift per checkpoint, with a recommendation."
	@echo "grid: runs/demo/grid.png"

# a pytest-xdist worker per core (at most 4), each test file on one worker (its fixtures are built once);
# tests/conftest.py gives each worker its share of the cores. PYTEST_ARGS="-n 0" runs in one process.
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the fast lane: everything but the tests marked slow (long trainings, subprocess launches, the notebook)
test-fast: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) -m "not slow"

lint: install
	$(BIN)/ruff check sdtune tests bench

clean:
	rm -rf runs .cache .pytest_cache
