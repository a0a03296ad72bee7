# sdtune: `make demo` and `make test` each work on a fresh clone (both build .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to a CPU build here so that a bare install does not pull a multi-GB CUDA build;
# on a GPU machine install the torch you need first, then `pip install -e .`.
TORCH ?= torch==2.13.0
DEMO_MODEL := .cache/demo/model-sd15

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	@test -f $(DEMO_MODEL)/model_index.json || $(BIN)/sdtune random-model $(DEMO_MODEL) --family sd15
	$(BIN)/sdtune train recipes/tiny_cpu.yaml
	$(BIN)/sdtune sample runs/demo --seeds 0,1,2 --lora-scale 0,1 --out runs/demo/grid.png
	@echo
	@echo "The grid above compares the base model (LoRA x0) with the trained LoRA (LoRA x1)."
	@echo "The demo model is a tiny *random* network, so every cell is coloured noise: the demo proves that"
	@echo "data -> class images -> training -> checkpoints -> LoRA file -> sampling runs end to end offline."
	@echo "The same run on a real model (GPU, internet): see README.md, 'Real GPU quick start'."

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sdtune tests bench

clean:
	rm -rf runs .cache .pytest_cache
