"""Writes the pickles that tests/test_legacy_checkpoints.py loads: converted models saved by sdepth_ext 0.2.0
as it was before the layered-package redesign (commit 4ffdfb0). Kept to show how they were made; rerunning it
with a newer sdepth_ext writes that version's files, not the legacy ones.

    python tests/data/make_legacy_checkpoints.py tests/data

Files (each ``torch.save``):
* ``legacy_cifar8_batch.pt``: ``{"model": <whole converted cifar_resnet(8)>, "state_dict": ..., "x": input,
  "expected": {...}}`` after two training steps, batch mode, paper scaling, seed 7.
* ``legacy_vit_row.pt``: the same for a tiny timm ViT (two units per block) in row mode, inverted scaling,
  with ``checkpoint_blocks`` on.
``expected`` holds what the saved model does next: its eval output on ``x``, the scheduler state, and the
plans of its next two training steps (counts and survivors).
"""

import sys
from pathlib import Path

import torch

import sdepth_ext as sd


def _next_plans(model, x, steps=2):
    scheduler = sd.get_scheduler(model)
    plans = [scheduler.draw(scheduler.step + k, x.shape[0]) for k in range(steps)]
    return [{"counts": list(p.counts), "survivors": [p.survivors(l) for l in range(p.num_units)]}
            for p in plans]


def _save(model, x, path):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
    expected = {"eval": out, "scheduler": sd.get_scheduler(model).state_dict(),
                "plans": _next_plans(model, x), "survival": sd.survival_probs(model)}
    torch.save({"model": model, "state_dict": model.state_dict(), "x": x, "expected": expected}, path)


def main(folder: str) -> None:
    torch.manual_seed(0)
    out = Path(folder)
    cifar = sd.convert(sd.cifar_resnet(8), p_last=0.5, mode="batch", seed=7)
    _save(cifar, torch.randn(4, 3, 8, 8), out / "legacy_cifar8_batch.pt")

    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, embed_dim=32,
                            num_heads=2, num_classes=3, drop_path_rate=0.3)
    vit = sd.convert(vit, mode="row", seed=11)
    sd.checkpoint_blocks(vit)
    _save(vit, torch.randn(4, 3, 16, 16), out / "legacy_vit_row.pt")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
