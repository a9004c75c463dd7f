"""The README's Python examples run as written, on the tiny Llama instead of SmolLM2-135M.

Each ```python block of README.md is extracted verbatim and ``exec``-ed in a fresh namespace, in a
temporary working directory, with ``riemix.load_model`` replaced by a function returning the tiny Llama
and the tiny tokenizer of ``tests/helpers.py``: what is tested is the README's exact text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import riemix
from riemix import MoELoRALinear
from tests.helpers import make_tiny_llama, tiny_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The contents of the ```python fences of a Markdown text, in order."""
    return PYTHON_BLOCK.findall(text)


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


class FakeLoader:
    """Stands in for ``riemix.load_model``: records its calls, returns a fresh tiny Llama each time."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, name_or_path: str, task: str = "causal_lm", **kwargs):
        if task != "causal_lm":
            raise ValueError(f"the README test's stand-in loads causal LMs only, got task={task!r}")
        self.calls.append((name_or_path, kwargs))
        return make_tiny_llama(), tiny_tokenizer()


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n\nc = 3\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n\nc = 3\n"]


def test_readme_has_a_library_example_that_loads_a_model():
    assert BLOCKS, "README.md has no ```python block"
    assert any("riemix.load_model(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    loader = FakeLoader()
    monkeypatch.setattr(riemix, "load_model", loader)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102

    if "riemix.load_model(" not in BLOCKS[index]:
        return
    assert loader.calls and all(name == "smollm2-135m" for name, _ in loader.calls)
    # the library example: one step trained the adapter, which was saved, reloaded and removed again
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert "'lora_A'" in capsys.readouterr().out
    plain = namespace["plain"]
    assert not any(isinstance(m, MoELoRALinear) for m in plain.modules())
    fresh = make_tiny_llama()
    got, want = plain.state_dict(), fresh.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
