"""The README's "Running where users run" snippets run as written (CPU here; they pick CUDA when present).

Two are not run: the DDP one is a ``torchrun`` script (tests/test_ddp.py covers the same calls with two gloo
processes) and the torch.compile one takes about a minute of inductor compilation on a CPU
(tests/test_compile.py covers ``compile_blocks``).
"""

from __future__ import annotations

import pathlib
import re

import pytest

from sdepth_ext.convert import get_state

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Running where users run"


def _snippets() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README lost its section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_section_has_the_snippets():
    snippets = _snippets()
    assert any("ddp_ready" in s for s in snippets)
    assert any("compile_blocks" in s for s in snippets)
    assert any("checkpoint_blocks" in s for s in snippets)
    assert any("autocast" in s for s in snippets)
    assert any("set_dropped_grads" in s for s in snippets)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_snippets_run():
    namespace: dict = {}
    ran = 0
    for snippet in _snippets():
        if "init_process_group" in snippet or "compile_blocks(model" in snippet:
            continue
        exec(compile(snippet, str(README), "exec"), namespace)
        ran += 1
    assert ran >= 4
    model = namespace["model"]
    # The last snippet switched the converted model to zero gradients for dropped blocks.
    assert get_state(model).dropped_grads == "zero"
