"""Inference latency of depth-pruned models (``sd.prune``): the latency ratio next to the FLOP ratio.

``cifar_resnet(110)`` (54 blocks, 18 per stage) with the last m blocks of every stage removed by
``sd.prune``, m = 0, 3, 6, 9, against the hand-written comparator: the same architecture built directly with
18 - m blocks per stage (``cifar_resnet(110 - 6 m)``), which is what a pruned model should cost. Eval mode,
no gradient, the rounds interleaved (a load drift hits all variants alike); ratios of medians to the full
model, and the FLOP ratio of the pruned model (its MACs over the full model's).

    python -m benchmarks.bench_prune            # GPU: batch 128; CPU: batch 32
    python -m benchmarks.bench_prune --smoke    # seconds; its numbers are not measurements
"""

from __future__ import annotations

import torch

import sdepth_ext as sd
from sdepth_ext.flops import total_macs

from . import common

BLOCKS_PER_STAGE = 18  # cifar_resnet(110)


def stage_tail(m: int, per_stage: int = BLOCKS_PER_STAGE) -> list[int]:
    """Unit indices of the last ``m`` blocks of each of the three stages (never a stage's first block)."""
    return [stage * per_stage + b for stage in range(3) for b in range(per_stage - m, per_stage)]


def run(smoke: bool = False) -> tuple[list[dict], dict]:
    device = common.best_device()
    batch = 4 if smoke else (128 if device.type == "cuda" else 32)
    removed = (0, 9) if smoke else (0, 3, 6, 9)
    repeat = 3 if smoke else (30 if device.type == "cuda" else 15)
    torch.manual_seed(0)
    full = sd.convert(sd.cifar_resnet(110), scaling="paper", seed=0).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    variants, meta = {}, {}
    for m in removed:
        pruned = sd.prune(full, stage_tail(m)).to(device)
        torch.manual_seed(0)
        by_hand = sd.cifar_resnet(110 - 6 * m).to(device).eval()
        variants[f"pruned -{m}/stage"] = pruned
        variants[f"by hand depth {110 - 6 * m}"] = by_hand
        meta[m] = total_macs(pruned, x[:1])

    def forward(model):
        def call():
            with torch.no_grad():
                model(x)
        return call

    times = common.time_interleaved({name: forward(model) for name, model in variants.items()}, device,
                                    warmup=2, repeat=repeat, calls=1)
    full_time = common.median(times["pruned -0/stage"])
    rows = []
    for m in removed:
        pruned_t = common.median(times[f"pruned -{m}/stage"])
        hand_t = common.median(times[f"by hand depth {110 - 6 * m}"])
        rows.append({"bench": "prune", "model": "cifar_resnet110", "batch": batch, "removed_blocks": 3 * m,
                     "depth": 110 - 6 * m, "pruned_ms": pruned_t * 1e3, "by_hand_ms": hand_t * 1e3,
                     "latency_ratio": pruned_t / full_time, "by_hand_ratio": hand_t / full_time,
                     "over_hand": pruned_t / hand_t, "flop_ratio": meta[m] / meta[0]})
    return rows, {name: ts for name, ts in times.items()}


def main(argv=None) -> list[dict]:
    args = common.parse_size_args(argv, __doc__.splitlines()[0],
                           smoke_help="seconds-long run; its numbers mean nothing")
    env = common.environment(common.best_device())
    common.print_environment(env)
    rows, samples = run(smoke=args.smoke)
    print(common.format_table(rows, ["model", "batch", "removed_blocks", "depth", "pruned_ms", "by_hand_ms",
                              "latency_ratio", "by_hand_ratio", "over_hand", "flop_ratio"]))
    paths = common.write_results("prune" + common.size_suffix(args.smoke), rows, env, samples=samples)
    print("wrote " + ", ".join(str(p) for p in paths))
    return rows


if __name__ == "__main__":
    main()
