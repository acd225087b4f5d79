#!/usr/bin/env bash
# Regenerate constraints.txt: install the project with its test extra into a fresh venv, unconstrained, so pip takes
# the newest versions that pyproject.toml's ranges allow, and freeze what it installed. Then test that set:
#
#   bash tools/lock.sh             # writes constraints.txt (a minute or two)
#   bash .ci/run                   # the README's test command on this checkout, now with the new constraints
#
# Commit constraints.txt only when the tests pass. Local version labels are dropped (torch 2.13.0+cpu is written
# torch==2.13.0), so the same file takes the CPU wheel here and the CUDA build on a GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet "torch==2.13.0"  # first, so no other package's torch>= pulls a CUDA build
"$tmp/venv/bin/pip" install --quiet "$root[test]"
{
  echo "# Versions tested together; the README's commands install with -c constraints.txt."
  echo "# Regenerate with: bash tools/lock.sh (then bash .ci/run). Written $(date -u +%F) by Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')."
  "$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -viE '^(icrl-fast|icrl_fast|pip|setuptools|wheel)[= @]' |
    sed -E 's/^([^=]+==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$root/constraints.txt"
echo "wrote $root/constraints.txt ($(grep -vc '^#' "$root/constraints.txt") packages)"
