# d2c-sr developer entry points. Every target sets itself up: it creates .venv at the
# repository root if missing and installs torch/torchvision, basicsr and this package.
#   make demo   - the main job: train a small D2C-SR on real photos on CPU, report PSNR/SSIM
#   make test   - lint (ruff, yapf) and the whole test suite
#   make test-fast - the tests without those marked slow (demo training, several processes)
#   make lint   - lint only; `make format` rewrites the code to the project's style
#   make bench  - benchmarks (print numbers; not part of the tests); real photos from D2C_SR_DATA
#   make gpu-check - every CUDA path in one bounded run, a table to paste (CPU rows only without a GPU)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.d2c-sr-installed

# torch/torchvision pairs known to import together here; override e.g.
#   make test TORCH_PKGS="torch==2.5.1 torchvision==0.20.1"
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PKGS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install lint format test test-fast demo bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install $(TORCH_PKGS)
	# basicsr 1.4.2 ships only a source archive whose setup.py imports torch
	$(BIN)/python -m pip install --no-build-isolation "basicsr==1.4.2"
	$(BIN)/python -m pip install --no-build-isolation -e ".[test,onnx,openvino,spandrel,perceptual]"
	touch $(STAMP)

# the code the style covers (settings in pyproject.toml)
CODE := d2c_utils d2c_arch d2c_data d2c_losses d2c_metrics d2c_inference d2c_convert d2c_deploy d2c_model d2c_tools scripts benchmarks tests setup.py d2c_compat.py d2c_autoload.py

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/yapf --diff --recursive $(CODE) > /dev/null || { $(BIN)/yapf --diff --recursive $(CODE) | head -40; \
		echo 'yapf: the code above is not in the project style; run `make format`'; exit 1; }

format: $(STAMP)
	$(BIN)/ruff check --fix --select I $(CODE)
	$(BIN)/yapf --in-place --recursive $(CODE)

test: lint
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_loader.py

gpu-check: $(STAMP)
	mkdir -p results
	$(BIN)/python benchmarks/gpu_check.py --json results/gpu_check.json

clean:
	rm -rf experiments results tb_logger build *.egg-info
