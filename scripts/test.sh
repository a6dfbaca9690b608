#!/usr/bin/env bash
# The project's test command (README): sets up .venv from the project's own files, then runs pytest.
# Usage: bash scripts/test.sh [pytest args...]
# The browser test (tests/test_browser.py) drives Debian's chromium through Playwright: when
# /usr/bin/chromium is missing and we are root (CI on a fresh machine), it is installed with apt here.
# Under CI=true the browser test fails (never skips) if chromium is still missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium (apt) for the browser test"
    log=.venv/apt-chromium.log
    # wait for a dpkg/apt lock another process holds (up to 10 min), and retry a failed download
    apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    for attempt in 1 2 3; do
      if { apt-get "${apt_opts[@]}" update && \
           DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends chromium; } \
           >> "$log" 2>&1; then
        break
      fi
      echo "test.sh: chromium install attempt $attempt failed; retrying" >&2
      sleep $((attempt * 10))
    done
    [ -x /usr/bin/chromium ] || { tail -n 30 "$log"; echo "test.sh: chromium install failed (log: $log)" >&2; }
  else
    echo "test.sh: /usr/bin/chromium is missing and this is not root: the browser test will be skipped (failed under CI=true)" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
