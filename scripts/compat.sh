#!/usr/bin/env bash
# The torch compatibility matrix, for releases (not CI: every torch is a fresh ~4 GB download).
#
#   bash scripts/compat.sh [TORCH_VERSION...]     (default: 2.4.1 2.9.1 2.15.0)
#
# For each version: a fresh venv (no system site-packages), the package installed from a wheel
# built once here (not editable), that torch from PyPI with the test dependencies, and every test
# file that uses torch's own classes (interop, torchrun, and the others importing torch). Each
# venv is removed after its run. The table of docs/compatibility.md between the compat markers
# gets one row per version run; rows of versions not run this time are kept. The exit code is 1 if any failed.
#
# PYTHON picks the interpreter the venvs are made from (default python3).
set -euo pipefail
# The braces make bash read the whole script before running it: editing it during a run is safe.
{
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ "$#" -gt 0 ]; then
    VERSIONS=("$@")
else
    VERSIONS=(2.4.1 2.9.1 2.15.0)
fi
# Every test file that imports torch.
mapfile -t TESTS < <(grep -l -E '^\s*(import|from) torch\b' tests/test_*.py | sort)

work="$(mktemp -d "${TMPDIR:-/tmp}/elastic-timer-compat.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap cleans up

"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" .
wheel=("$work"/wheel/elastic_timer-*.whl)

results="$work/results.tsv"
: >"$results"
status=0
for version in "${VERSIONS[@]}"; do
    venv="$work/venv-$version"
    log="$work/pytest-$version.log"
    echo "== torch $version: installing" >&2
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "${wheel[0]}[test]" "torch==$version"
    installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    python="$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
    # The tests must see the installed wheel, not the source tree.
    "$venv/bin/python" -c 'import elastic_timer, sys; sys.exit("elastic_timer from " +
        elastic_timer.__file__) if sys.prefix not in elastic_timer.__file__ else None'

    echo "== torch $installed: ${TESTS[*]}" >&2
    # venv/bin first on PATH: the torchrun tests run the elastic-timer-run it installed.
    if PATH="$venv/bin:$PATH" nice "$venv/bin/python" -m pytest -p no:cacheprovider -q \
        "${TESTS[@]}" 2>&1 | tee "$log" >&2; then
        outcome=passed
    else
        outcome=failed
        status=1
    fi
    # pytest's closing line, e.g. "== 3 failed, 120 passed in 96.01s ==", without the time.
    summary="$(tail -n 1 "$log" | sed -E 's/^=+ //; s/ in [0-9.]+s.*$//')"
    failures="$(grep -E '^(FAILED|ERROR) ' "$log" | sed -E 's/^(FAILED|ERROR) ([^ ]+).*/\2/' |
        paste -sd ' ' || true)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$version" "$installed" "$python" "$outcome" \
        "$summary" "$failures" >>"$results"
    rm -rf "$venv"
done

# One row per torch version, sorted by version; a row of a version not run this time is kept.
"$PYTHON" - docs/compatibility.md "$results" "$(date -u +%F)" "${TESTS[*]}" <<'PY'
import re
import sys

page, results, date, tests = sys.argv[1:5]
begin, end = "<!-- torch-compat:begin -->", "<!-- torch-compat:end -->"
text = open(page).read()
if begin not in text or end not in text:
    sys.exit(f"{page} has no {begin} ... {end} markers for the table")
head, rest = text.split(begin, 1)
old, tail = rest.split(end, 1)
rows = {}
for line in old.splitlines():
    match = re.match(r"\| (\d[^ |]*) \|", line)
    if match:
        rows[match.group(1)] = line
for line in open(results).read().splitlines():
    version, installed, python, outcome, summary, failures = line.split("\t")
    result = outcome + (f": {failures}" if failures else "")
    rows[version] = f"| {version} | {installed} | {python} | {result} | {summary} | {date} |"
order = sorted(rows, key=lambda v: [int(p) if p.isdigit() else p for p in re.split(r"[.+]", v)])
table = [
    "Test files: " + ", ".join(f"`{t}`" for t in tests.split()) + ".",
    "",
    "| torch | installed build | Python | result | tests | date |",
    "| --- | --- | --- | --- | --- | --- |",
    *(rows[v] for v in order),
]
open(page, "w").write(head + begin + "\n" + "\n".join(table) + "\n" + end + tail)
PY
exit "$status"
}
