# The everyday loop. `make test` is exactly what CI runs (.ci/run runs scripts/test.sh).
.PHONY: build-dev lint test-fast test bench wheels

# An editable install with the test and lint tools: Python edits apply at once; run it again
# after a Rust change to rebuild the extension.
build-dev:
	python3 -m pip install -e '.[dev]'

# cargo fmt, clippy, ruff, mypy and actionlint.
lint:
	bash scripts/lint.sh

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
