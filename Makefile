# Two entry points on a fresh machine:  `make run` (set up + the default pipeline)  and  `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# offline and quiet: no hub downloads, no telemetry
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export SE_AVOID_STATS := true

.PHONY: install run lint browser test test-fast bench
install: $(VENV)/.installed

# uv installs in well under half of pip's time (docs/benchmarks.md), from the sources pip is configured with
# (tools/uv_env.py); the assets go first, as bytecode is compiled for the whole environment at the end
UV := $(BIN)/uv pip install -q --python $(BIN)/python --no-cache
$(VENV)/.installed: pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv>=0.5"
	eval "$$($(BIN)/python tools/uv_env.py)" \
	  && $(UV) --no-deps -r requirements-assets.txt \
	  && $(UV) --compile-bytecode -e '.[dev,dask]'  # the tests cover the dask extra too
	$(BIN)/python -m lfdm.plots_html  # dvc plots show's page with vega inlined (.dvc/config: plots.html_template)
	touch $@

run: install  ## the whole pipeline on the embedded dataset, one MLflow parent run
	lfdm repro

lint: install  ## what the pre-commit hooks run: ruff (rules + format) and pyright (basic)
	ruff check .
	ruff format --check .
	pyright -p .  # this project's config (pyproject.toml), whatever pyrightconfig.json lies above it

APT_BROWSER := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
browser:  ## Chromium + chromedriver for the web page's test (Debian, as root); elsewhere that test is skipped
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { $(APT_BROWSER) >/dev/null || { apt-get update -q >/dev/null && $(APT_BROWSER) >/dev/null; }; }; } \
	  || echo "no Chromium here: the tests marked browser will be skipped"

test: install lint browser  ## lint, then unit tests + end-to-end runs against real DVC, Prefect and MLflow servers
	pytest -q

test-fast: install
	pytest -q -m "not slow"
