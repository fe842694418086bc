# Set-up is part of each target: a fresh clone needs nothing but Python 3.10+ and make.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override for a CUDA machine, e.g. make TORCH_SPEC=torch demo
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/metalr demo

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15
	$(MAKE) lint

lint: setup
	$(VENV)/bin/ruff check metalr tests bench examples
	$(VENV)/bin/mypy metalr

clean:
	rm -rf $(VENV)
