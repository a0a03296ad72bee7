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
	rm -rf runs/demo
	$(BIN)/sdtune train recipes/tiny_cpu.yaml
	$(BIN)/sdtune sample runs/demo --seeds 0,1,2 --lora-scale 0,1 --out runs/demo/grid.png
	@echo
	@echo "runs/demo/grid.png: rows 'LoRA x0' are the base model, rows 'LoRA x1' the same seeds with the trained LoRA."
	@echo "The demo model is a tiny *random* network, so every cell is coloured noise; that the x1 rows differ"
	@echo "from the x0 rows shows the adapter was trained, saved and loaded. The demo proves that data -> class"
	@echo "images -> training -> checkpoints -> LoRA file -> sampling runs end to end offline on a CPU."
	@echo "Training-time grids: runs/demo/samples/. The same on a real model: README.md, 'Real GPU quick start'."

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check sdtune tests bench

clean:
	rm -rf runs .cache .pytest_cache
