# The everyday loop. `make test` is exactly what CI runs (.ci/run runs scripts/test.sh).
.PHONY: install setup format lint docs test-fast test bench wheels

# An editable install with the test and lint tools: Python edits apply at once; run it again
# after a Rust change to rebuild the extension.
install:
	python3 -m pip install -e '.[dev]'

# The system packages the tests need (Debian's, with apt-get); scripts/test.sh runs it too.
setup:
	bash scripts/setup-system.sh

# Rewrites the code in place: cargo fmt, ruff format, and ruff's fixable lints.
format:
	cargo fmt --all
	python3 -m ruff format python tests examples benches scripts
	python3 -m ruff check --fix python tests examples benches scripts

# cargo fmt, clippy, ruff, mypy, actionlint and the documentation's strict build.
lint:
	bash scripts/lint.sh

# The documentation site at http://127.0.0.1:8000, rebuilt on every edit.
docs:
	NO_MKDOCS_2_WARNING=1 python3 -m mkdocs serve

# What CI runs but the fuzzing and the torchrun jobs.
test-fast:
	FUZZ_SECONDS=0 bash scripts/test.sh -m "not torchrun"

test:
	bash scripts/test.sh

# Every benchmark against torch (~6 minutes); benches/README.md has the smaller runs.
bench:
	python3 benches/run.py

# The x86_64 manylinux wheel and the sdist, into dist/.
wheels:
	bash scripts/build-wheels.sh
