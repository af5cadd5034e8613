#!/usr/bin/env bash
# The system packages the tests need, from Debian's archive with apt-get (as root, else with
# sudo); only what is missing is installed, so a machine that has them runs no apt-get at all.
# scripts/test.sh runs it first, so that `bash scripts/test.sh` works on a fresh machine;
# `make setup` runs it alone.
set -euo pipefail

packages=()
# tests/test_clock.py steps a server's wall clock with libfaketime.
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || packages+=(libfaketime)
# tests/test_report_view.py renders elastic-timer report's page in headless chromium.
command -v chromium >/dev/null || packages+=(chromium)

[ "${#packages[@]}" -gt 0 ] || exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
