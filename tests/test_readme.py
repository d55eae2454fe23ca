"""The README and the docs stay true: the quick start runs as written and converts a model of every family
it shows, the two commands exist, every relative link resolves, and every table of results is what
``python -m benchmarks.report`` prints from the committed result files."""

from __future__ import annotations

import pathlib
import re

import pytest

import sdepth_ext as sd
from benchmarks import report
from sdepth_ext.state import units_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Words of a machine's name (CPU and GPU vendors, models) that only a cited result file may put on a page
MACHINE_WORDS = re.compile(r"\b(?:Intel|Xeon|AMD|EPYC|Ryzen|Threadripper|NVIDIA|GeForce|Tesla|Quadro|"
                           r"Graviton|Neoverse|Apple M\d)\b")


def _section(text: str, heading: str) -> str:
    assert heading in text, f"README lost its section {heading!r}"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    # 240: the generated result tables hold a row per model and mode (the Hugging Face rows added six).
    assert len(text.splitlines()) <= 240, "the README is an overview; details belong in docs/"
    commands = _section(text, "## Two commands")
    assert "make test " in commands and "make bench " in commands
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: ", makefile, re.M) and re.search(r"^bench: ", makefile, re.M)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_quick_start_runs_and_converts_every_family_it_shows():
    pytest.importorskip("timm", reason="the quick start shows timm: pip install sdepth_ext[timm]")
    snippets = re.findall(r"```python\n(.*?)```", _section(README.read_text(), "## Quick start"), re.S)
    assert len(snippets) >= 3
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    for name in ("model", "convnext", "effnet", "swin", "vit", "timm_resnet", "timm_convnext", "maxvit"):
        units = units_of(namespace[name])
        assert units, f"the quick start's {name} has no stochastic-depth unit"
        assert len(sd.survival_probs(namespace[name])) == len(units)
    # the defaults the text claims: the paper's for ResNets, the model's own for the others
    assert sd.survival_probs(namespace["model"])[-1] == pytest.approx(0.5)
    assert sd.survival_probs(namespace["convnext"])[-1] == pytest.approx(0.9)
    assert len(units_of(namespace["swin"])) == 2 * 12   # swin_t: 12 blocks, two units each


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = page.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "reproduction.md"],
                         ids=lambda p: p.name)
def test_result_tables_are_the_committed_files(page):
    """A table of results on these pages is pasted from ``benchmarks.report``: it must still be what the
    committed file holds, so a number can always be traced to its file (stamp included). So must every
    machine a heading or the prose names: cited from a file, never written by hand."""
    text = page.read_text()
    blocks = report.cited_blocks(text)
    assert blocks, f"{page.name} shows no result table from a committed file"
    update = "python -m benchmarks.report . --update-pages README.md docs/benchmarks.md docs/reproduction.md"
    for cited, body in blocks:
        assert body == report.render_cited(cited, ROOT), (
            f"{page.name}: the table from {cited} differs from the file ({update})")
    for cited, name in report.cited_machines(text):
        assert name == report.machine_of(cited, ROOT), (
            f"{page.name}: names the machine {name!r} for {cited}, which was measured on "
            f"{report.machine_of(cited, ROOT)!r} ({update})")
    by_hand = MACHINE_WORDS.findall(report.CITED_MACHINE.sub("", report.CITED_BLOCK.sub("", text)))
    assert not by_hand, (f"{page.name} names a machine by hand ({by_hand}): cite it from its result file, "
                         "<!-- machine from <file> --><!-- /machine -->, and run " + update)
