# One-command set-up on a fresh machine: `make demo` or `make test` creates .venv and installs first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-avx2 test-oldest bench clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## the best narrow PreActResNet18 that 70 s of training on the bundled sample allow, on any machine
	$(BIN)/python train.py --config configs/demo.yaml --time-budget 70s

test: $(STAMP)  ## the whole test suite, one worker per core (needs ../shared/data/cifar10-jpeg.tar.gz or CIFAR10_JPEG for the real-data tests)
	@# pytest exits 5 when it collects no tests: report it, but it is no failure of the code
	$(BIN)/python -m pytest -n auto --maxschedchunk 1; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-avx2: $(STAMP)  ## the suite on AVX2's kernels (most laptops), emulated on a CPU with AVX512 or AMX
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(MAKE) test

OLDEST := .venv-oldest
$(OLDEST)/.installed: requirements.txt requirements-oldest.txt pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -r requirements.txt -c requirements-oldest.txt
	$(OLDEST)/bin/python -m pip install --no-deps -e .
	touch $@

test-oldest: $(OLDEST)/.installed  ## the suite and a short training on the oldest torch, torchvision, timm, ... that requirements.txt admits
	$(OLDEST)/bin/python -m pytest -n auto --maxschedchunk 1
	$(OLDEST)/bin/python train.py --config configs/demo.yaml --epochs 1 --no-progress --tta none --run-name oldest \
		--checkpoint-dir $(OLDEST)/run/ck --log-dir $(OLDEST)/run/runs --fig-dir $(OLDEST)/run/fig

bench: $(STAMP)  ## the benchmarks written into BENCHMARKS.md
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf checkpoints runs fig data/cache
