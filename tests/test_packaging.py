"""What the installed distribution says of itself (run against the built wheel on every Python
the release claims): one version, Cargo.toml's; an SPDX license with its file; a typed abi3
package; and the running Python among those the classifiers claim, so a newly tested Python
must be added to them."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import elastic_timer
from elastic_timer import _native

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = importlib.metadata.distribution("elastic-timer")


def test_the_version_is_cargo_tomls_everywhere() -> None:
    cargo = re.search(r'^version = "([^"]+)"$', (ROOT / "Cargo.toml").read_text(), re.MULTILINE)
    assert cargo is not None
    assert elastic_timer.__version__ == DISTRIBUTION.version == cargo.group(1)


def test_the_classifiers_claim_this_python_and_requires_python_the_oldest() -> None:
    classifiers = DISTRIBUTION.metadata.get_all("Classifier") or []
    versions = (re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c) for c in classifiers)
    claimed = sorted((3, int(match.group(1))) for match in versions if match)
    assert sys.version_info[:2] in claimed, (sys.version_info, claimed)
    assert DISTRIBUTION.metadata["Requires-Python"] == f">=3.{claimed[0][1]}"
    assert "Typing :: Typed" in classifiers


def test_the_license_is_spdx_and_its_file_ships() -> None:
    assert DISTRIBUTION.metadata["License-Expression"] == "BSD-3-Clause"
    assert DISTRIBUTION.metadata.get_all("License-File") == ["LICENSE"]
    files = [str(path) for path in DISTRIBUTION.files or []]
    assert any(path.endswith(".dist-info/licenses/LICENSE") for path in files), files


def test_the_package_is_typed_and_its_extension_abi3() -> None:
    assert (Path(elastic_timer.__file__).parent / "py.typed").is_file()
    assert Path(_native.__file__).name == "_native.abi3.so"
