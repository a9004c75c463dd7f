"""riemix.data.catalog and ``riemix data``: every built-in dataset's layout, source and licence; folder checks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from riemix.cli import main
from riemix.data import BUILTIN_DATASETS, PACKAGED_DIR
from riemix.data.catalog import SOURCES, check_data_dir, describe_layout

ROOT = Path(__file__).resolve().parents[2]


def test_every_builtin_dataset_has_a_public_source_and_licence():
    assert set(SOURCES) == set(BUILTIN_DATASETS)
    text = describe_layout()
    for name in BUILTIN_DATASETS:
        assert f"\n{name}: " in text
        assert SOURCES[name].licence in text
    assert "    train commonsense_qa/train.jsonl" in text
    assert "    dev   piqa/valid.jsonl, piqa/valid-labels.lst" in text


def test_no_developer_machine_path_in_messages_or_docs():
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("docs").glob("*.md"), ROOT / "README.md"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"/work/(shared|main)|/root/|\.\./shared", text), path


def test_check_data_dir_reports_ok_missing_and_malformed(tmp_path):
    shutil.copytree(PACKAGED_DIR / "arc_easy", tmp_path / "arc_easy")
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text('{"question": "q", "passage": "p", "label": true}\nnot json\n')
    found = {c.name: c for c in check_data_dir(tmp_path)}
    assert (found["arc_easy"].status, found["arc_easy"].detail) == ("ok", "train 2,251 rows, dev 570 rows")
    assert found["boolq"].status == "malformed" and "val.jsonl:2" in found["boolq"].detail
    assert (found["glue/rte"].status, found["glue/rte"].detail) == ("missing", "glue/RTE/dev.tsv, glue/RTE/train.tsv")
    with pytest.raises(ValueError, match=r"--data-dir .*nowhere: not a directory"):
        check_data_dir(tmp_path / "nowhere")


def test_riemix_data_command(tmp_path, capsys):
    assert main(["data"]) == 0
    assert "public copy: github.com/" in capsys.readouterr().out
    shutil.copytree(PACKAGED_DIR / "arc_easy", tmp_path / "arc_easy")
    assert main(["data", "--check", str(tmp_path)]) == 0
    assert f"1 of {len(BUILTIN_DATASETS)} datasets usable from {tmp_path}" in capsys.readouterr().out
    (tmp_path / "arc_easy" / "dev.jsonl").write_text("{")
    assert main(["data", "--check", str(tmp_path)]) == 1
    assert main(["data", "--check", str(tmp_path / "x")]) == 2
    assert "riemix data: error: --data-dir" in capsys.readouterr().err
