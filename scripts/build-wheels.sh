#!/usr/bin/env bash
# Builds what a release ships into dist/: one abi3 wheel for x86_64 Linux (CPython 3.9 and
# later) and the sdist. The wheel is linked with zig against glibc 2.17 (manylinux2014), so it
# installs on RHEL 8's glibc 2.28 and older clusters too, with no Docker here and no Rust on
# the machine that installs it. The release workflow (.github/workflows/release.yml) builds the
# other platforms.
set -euo pipefail
cd "$(dirname "$0")/.."

# ziglang 0.15.2 is the zig that maturin's own CI cross-compiles with.
python3 -m pip install --quiet "maturin>=1.9.4,<2" "ziglang==0.15.2" auditwheel

rm -f dist/elastic_timer-*.whl dist/elastic_timer-*.tar.gz
python3 -m maturin build --release --zig --compatibility manylinux2014 \
    --target x86_64-unknown-linux-gnu --out dist
python3 -m maturin sdist --out dist
# maturin checked the glibc symbols already; auditwheel is a second opinion.
python3 -m auditwheel show dist/elastic_timer-*.whl
ls -l dist/elastic_timer-*
