"""Project metadata: the Apache-2.0 LICENSE file and what pyproject.toml declares about it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import riemix

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_license_file_is_the_apache_2_text_with_our_copyright():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 the riemix authors" in text
    assert "[yyyy]" not in text


def test_pyproject_declares_the_license_and_where_the_project_lives():
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
    assert PROJECT["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])  # PEP 639 forbids both
    assert PROJECT["authors"] == [{"name": "riemix authors"}]
    assert PROJECT["readme"] == "README.md" and PROJECT["keywords"]
    assert set(PROJECT["urls"]) >= {"Homepage", "Documentation", "Issues"}
    assert all(url.startswith("https://github.com/riemix/riemix") for url in PROJECT["urls"].values())
    assert PROJECT["version"] == riemix.__version__


def test_load_model_is_public_and_imported_on_first_use():
    from riemix.hub.loading import load_model

    assert "load_model" in riemix.__all__ and "load_model" in dir(riemix)
    assert riemix.load_model is load_model
    assert {"remove_moe_lora", "trainable_parameters"} <= set(riemix.__all__)
    assert all(hasattr(riemix, name) for name in riemix.__all__)


def test_import_riemix_does_not_load_the_hub_tier_until_load_model_is_used():
    code = (
        "import json, sys, riemix\n"
        "before = sorted(m for m in sys.modules if m.startswith('riemix.hub') or m.startswith('transformers'))\n"
        "riemix.load_model\n"
        "print(json.dumps([before, 'riemix.hub.loading' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], True]


def test_unknown_attribute_of_riemix_is_an_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'riemix' has no attribute 'no_such_name'"):
        riemix.no_such_name  # noqa: B018
