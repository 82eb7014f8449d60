# Every target sets up .venv first if it is missing, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines of this project keep these wheels on local disk; other platforms may pick their own pair.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench bench-gpu clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Every size, so that the loss terms' overhead covers Ti, S and B, and the dense term's memory at 128 images (ARGS
# given after these override them).
BENCH_ARGS ?= --sizes vit-tiny,vit-small,vit-base --dense-batch 128

bench: $(STAMP)
	$(PY) scripts/benchmark.py $(BENCH_ARGS) $(ARGS)

bench-gpu: $(STAMP)
	$(PY) scripts/benchmark.py --device cuda $(ARGS)

clean:
	rm -rf outputs build *.egg-info
