#!/usr/bin/env bash
# Formatting, lints and the documentation's build, as scripts/test.sh runs them (it installs
# the tools first: the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features python -- -D warnings
python3 -m ruff check python tests examples benches scripts
python3 -m ruff format --check python tests examples benches scripts
python3 -m mypy
# The stub of the native module, checked against the compiled module.
python3 -m mypy.stubtest elastic_timer._native --allowlist stubtest-allowlist.txt
# The release workflow, which cannot run here. By path: a fresh pip install is not on pyenv's
# shims until a rehash.
"$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/actionlint" -color=false
# The documentation site (mkdocs.yml, docs/), into the gitignored site/: --strict fails on a
# broken link or anchor, or a page missing from the nav. NO_MKDOCS_2_WARNING silences
# mkdocs-material's banner about MkDocs 2.0.
NO_MKDOCS_2_WARNING=1 python3 -m mkdocs build --strict --quiet
