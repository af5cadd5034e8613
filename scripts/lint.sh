#!/usr/bin/env bash
# Formatting and lints, as scripts/test.sh runs them (it installs the tools first: the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features python -- -D warnings
python3 -m ruff check python tests examples benches
python3 -m ruff format --check python tests examples benches
python3 -m mypy
# The stub of the native module, checked against the compiled module.
python3 -m mypy.stubtest elastic_timer._native --allowlist stubtest-allowlist.txt
# The release workflow, which cannot run here. By path: a fresh pip install is not on pyenv's
# shims until a rehash.
"$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/actionlint" -color=false
