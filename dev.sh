#!/usr/bin/env bash
# One entry point for a fresh machine: each command creates the virtual environment and
# installs the project (again only when a pyproject changed) before it does its work.
#   ./dev.sh run [anima-gateway run options]   start the gateway on its embedded defaults
#   ./dev.sh test [pytest options]             lint, then the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
stamp="$venv/.installed"

ensure_env() {
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  local want
  want=$(cat pyproject.toml plugin-template/pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[test]' -e ./plugin-template
    echo "$want" > "$stamp"
  fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  run)
    ensure_env
    exec "$venv/bin/anima-gateway" run "$@"
    ;;
  test)
    ensure_env
    "$venv/bin/ruff" check .
    "$venv/bin/ruff" format --check --quiet .
    exec "$venv/bin/python" -m pytest tests plugin-template/tests "$@"
    ;;
  *)
    echo "usage: ./dev.sh run [options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
