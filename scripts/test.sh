#!/usr/bin/env bash
# Runs every test on a fresh machine: installs the package with its test and lint tools
# (torch among them, from PyPI) and Debian's libfaketime and chromium, checks formatting and
# lints, then runs the Rust unit tests and the whole pytest suite (torch-interop tests
# included; none is skipped), then fuzzes the two decoders and the ring reader briefly
# (cargo-fuzz on the stable toolchain, with RUSTC_BOOTSTRAP for its -Z flags). Arguments go
# to pytest: `make test-fast` runs `FUZZ_SECONDS=0 bash scripts/test.sh -m "not torchrun"`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade pip maturin
python3 -m pip install --quiet -e '.[dev]'
# From Debian: libfaketime (tests/test_clock.py steps a server's wall clock with it) and
# chromium (tests/test_report_view.py renders the hang report's page in it, headless).
missing=()
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || missing+=(libfaketime)
command -v chromium >/dev/null || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

bash scripts/lint.sh

cargo test --lib

# A bounded fuzz run of each decoder (and of the ring reader), from the committed seeds (fuzz/seeds); new inputs go to the
# uncommitted fuzz/corpus. FUZZ_SECONDS=0 skips it.
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    for target in decode_json_line decode_pickle ring_reader; do
        mkdir -p "fuzz/corpus/$target"
        (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" "seeds/$target" \
            -- -max_total_time="$FUZZ_SECONDS")
    done
fi

# Last, so its summary is the run's closing line.
python3 -m pytest "$@"
