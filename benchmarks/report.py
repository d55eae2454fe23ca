"""Markdown tables from committed result files, for the README's results section.

    python -m benchmarks.report benchmarks/results/cpu      # summary + ResNet tables of that device

Reads ``summary.json`` and ``resnet.json`` (written by ``make bench``) and prints what they hold, with the
stamp (device, versions, date, command) of the run, so a README number can always be traced to a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import ratio_text


def _stamp(env: dict) -> str:
    return (f"{env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"torchvision {env['torchvision']}; {env['date']}; `{env['command']}`")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_markdown(path: Path) -> str:
    data = json.loads(path.read_text())
    header = ["what", "sdepth_ext", "peers", "ratio", "ideal / limit"]
    rows = [[r["what"], r["sdepth_ext"], r["peers"], r["ratio"], r["ideal/limit"]] for r in data["rows"]]
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def resnet_markdown(path: Path) -> str:
    data = json.loads(path.read_text())
    header = ["model", "variant", "mean step (trimmed)", "ratio to plain [95% CI]", "ideal (FLOPs)",
              "ideal, drawn plans (FLOPs)", "ideal, drawn plans (block times)", "steps"]
    rows = []
    for r in data["rows"]:
        rows.append([f"{r['model']} b{r['batch']}@{r['size']}", r["variant"], f"{r['mean_ms']:.0f} ms",
                     ratio_text(r), f"{r['ideal_ratio']:.3f}",
                     f"{r.get('drawn_ideal_ratio', 1.0):.3f}", f"{r.get('drawn_time_ideal_ratio', 1.0):.3f}",
                     str(r["steps"])])
    return f"Run: {_stamp(data['environment'])}\n\n{_table(header, rows)}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="e.g. benchmarks/results/cpu")
    parser.add_argument("--suffix", default="", help="'_full' or '_smoke' for those runs' files")
    args = parser.parse_args(argv)
    parts = []
    for name, render in (("summary", summary_markdown), ("resnet", resnet_markdown)):
        path = args.results_dir / f"{name}{args.suffix}.json"
        if not path.exists():
            raise SystemExit(f"results_dir: {path} not found (run `make bench` first)")
        parts.append(f"<!-- from {path} -->\n{render(path)}")
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
