# Two commands on a fresh machine: `make up` runs the farm, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test lint install clean-var chromium

# The Python client (clients/python) is installed too: its `renderfarm` CLI passes the operator commands (`up`,
# `create-key`, `migrate`, `owners`) on to the farm's own script, `renderfarm-admin` (devtools.cli).
$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet -e 'clients/python[cli,webhooks]'
	@$(MAKE) --no-print-directory chromium
	@touch $(STAMP)

# Debian's chromium for the admin dashboard's browser test; skipped (the test skips too) when not root.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "chromium not installed (needs root and apt-get): the browser test will skip"

install: $(STAMP)

up: $(STAMP)
	$(PY) -m devtools.cli up

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean-var:
	rm -rf var
