#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the package with its test and lint tools
# (torch among them, from PyPI), checks formatting and lints, then runs the Rust unit tests
# and the whole pytest suite (torch-interop tests included; none is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade pip maturin
python3 -m pip install --quiet -e '.[dev]'

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features python -- -D warnings
python3 -m ruff check python tests examples
python3 -m mypy

cargo test --lib
python3 -m pytest
