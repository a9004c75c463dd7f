"""riemix.io.fileio: publishing whole directories atomically (files: see test_adapter's atomic-save test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from riemix.io import fileio


def _build(final: Path, text: str) -> Path:
    tmp = fileio.sibling_temp_path(final)
    tmp.mkdir()
    (tmp / "data.txt").write_text(text)
    return tmp


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_sibling_temp_path_is_hidden_and_unique(tmp_path):
    final = tmp_path / "out"
    a, b = fileio.sibling_temp_path(final), fileio.sibling_temp_path(final, "old")
    assert a.parent == b.parent == tmp_path
    assert a.name.startswith(".out.tmp.") and b.name.startswith(".out.old.")
    assert f".{os.getpid()}." in a.name
    assert a != fileio.sibling_temp_path(final)
    assert not a.exists() and not b.exists()


def test_publish_dir_creates_then_replaces(tmp_path):
    final = tmp_path / "out"
    assert fileio.publish_dir(_build(final, "one"), final) is True
    assert (final / "data.txt").read_text() == "one"
    assert fileio.publish_dir(_build(final, "two"), final) is True
    assert (final / "data.txt").read_text() == "two"
    assert _hidden(tmp_path) == []


def test_publish_dir_keeps_an_existing_directory_the_caller_accepts(tmp_path):
    final = tmp_path / "out"
    fileio.publish_dir(_build(final, "theirs"), final)
    ours = _build(final, "ours")
    seen = []

    def keep(found: Path) -> bool:
        seen.append(found)
        return True

    assert fileio.publish_dir(ours, final, keep_existing=keep) is False
    assert seen == [final]
    assert (final / "data.txt").read_text() == "theirs"
    assert (ours / "data.txt").read_text() == "ours"  # left for the caller to delete


def test_publish_dir_gives_up_when_the_path_keeps_reappearing(tmp_path, monkeypatch):
    final = tmp_path / "out"
    tmp = _build(final, "ours")
    moved = []

    def recreate(path):
        moved.append(path)  # another writer puts a directory back every time
        return fileio.sibling_temp_path(path, "old")

    monkeypatch.setattr(fileio, "_move_aside", recreate)
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)  # the fall-back path of other systems
    final.mkdir()
    (final / "other.txt").write_text("x")
    with pytest.raises(FileExistsError, match="could not publish"):
        fileio.publish_dir(tmp, final, attempts=2)
    assert moved == [final, final]


def test_the_fallback_publish_deletes_the_old_directory_only_once_the_new_one_is_in(tmp_path, monkeypatch):
    final = tmp_path / "out"
    fileio.publish_dir(_build(final, "old"), final)
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    seen = []
    real_rmtree = fileio.shutil.rmtree

    def rmtree(path, **kw):
        seen.append((final / "data.txt").read_text())  # what stands at final while the old one is deleted
        real_rmtree(path, **kw)

    monkeypatch.setattr(fileio.shutil, "rmtree", rmtree)
    assert fileio.publish_dir(_build(final, "new"), final) is True
    assert seen == ["new"] and _hidden(tmp_path) == []


def test_discard_dir_removes_a_tree_and_ignores_a_missing_one(tmp_path):
    target = tmp_path / "gone"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "f").write_text("x")
    fileio.discard_dir(target)
    fileio.discard_dir(target)
    assert list(tmp_path.iterdir()) == []


def test_recover_dir_puts_back_what_a_crashed_fallback_publish_renamed_aside(tmp_path):
    final = tmp_path / "adapter"
    fileio.publish_dir(_build(final, "good"), final)
    aside = tmp_path / f".adapter.old.{fileio._host_tag()}.999999999.deadbeef"  # a writer that died mid-swap
    os.rename(final, aside)
    assert fileio.recover_dir(final) is True
    assert (final / "data.txt").read_text() == "good" and not aside.exists()
    assert fileio.recover_dir(final) is False  # nothing to do when the directory is there


def test_publish_dir_swaps_atomically_where_the_system_can(tmp_path, monkeypatch):
    final = tmp_path / "out"
    fileio.publish_dir(_build(final, "one"), final)
    calls = []
    real = fileio._exchange
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    monkeypatch.setattr(fileio, "discard_dir", lambda p: pytest.fail("no rename-aside needed"))
    assert fileio.publish_dir(_build(final, "two"), final) is True
    assert len(calls) == 1 and (final / "data.txt").read_text() == "two" and _hidden(tmp_path) == []


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path):
    fileio.atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode
