#!/usr/bin/env bash
# The project's static checks (CONTRIBUTING.md): lint, formatting, types, and the import layering.
#   bash scripts/lint.sh        # after scripts/setup.sh (or scripts/test.sh) made .venv
# ruff and mypy read pyproject.toml; lint-imports reads the [tool.importlinter] contracts there
# (the data-flow layers, no import cycle between siblings, no viz in the library).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m mypy
.venv/bin/lint-imports
