"""Hugging Face Swin and Swinv2 layers, ``SwinLayer`` / ``Swinv2Layer``, on tokens [B, H*W, C].

The forwards reproduced (transformers ``SwinLayer.forward``, ``Swinv2Layer.forward``)::

    # Swin (pre-norm); only the attention unit has a drop path, the MLP unit stays ungated
    x = x + drop_path(windows(attention, layernorm_before(x)))
    x = x + dropout(mlp(layernorm_after(x)))                                  # not a unit
    return x, attention_weights

    # Swinv2 (post-norm); one drop_path module for both units
    x = x + drop_path(layernorm_before(windows(attention, x)))
    x = x + drop_path(layernorm_after(output(intermediate(x))))
    return (x, attention_weights) if output_attentions else (x,)

``windows(attention, t)`` is the layer's shifted-window attention: the tokens viewed as [B, H, W, C], padded
to the window size, cyclically shifted, partitioned into windows, attended (with the layer's shift mask),
merged back, shifted back and cropped; HF has no module for it, so :func:`_windowed_attention` repeats those
steps with the layer's own helpers. Windows never span samples, so row mode on the survivors is exact.
The layer's ``input_dimensions`` (and ``always_partition``, attention settings) pass to the attention unit.
Swin v1's MLP runs in :meth:`~sdepth_ext.families.UnitAdapter.exit`, outside every unit, after the attention
unit; the layer returns HF's tuple. ``attention_weights`` are those of the attention unit when it ran (the
survivors' windows in row mode), None when it was dropped; Swinv2 returns them when ``output_attentions``
is set and the unit ran. Defaults: the model's per-layer ``drop_path_rate`` schedule, row mode, "inverted".
"""

from __future__ import annotations

from transformers.models.swin import modeling_swin as swin
from transformers.models.swinv2 import modeling_swinv2 as swinv2

from ._hf_sd import HFAdapter
from .base import scale_affine
from .registry import register_adapter

_WEIGHTS = "_hf_attention_weights"  # the attention unit's weights, from residual to exit within one call


def _windowed_attention(block, t, input_dimensions, v2, **kwargs):
    """The attention of the layer's windows on tokens ``t`` [B, H*W, C] (HF's forward, steps in order)."""
    height, width = input_dimensions
    batch_size, _, channels = t.shape
    t, pad_values = block.maybe_pad(t.view(batch_size, height, width, channels), height, width)
    _, height_pad, width_pad, _ = t.shape
    module = swinv2 if v2 else swin
    if v2:
        shifted = t if block.shift_size <= 0 else t.roll((-block.shift_size, -block.shift_size), (1, 2))
    else:
        shifted = block.cyclic_shift(t)
    windows = module.window_partition(shifted, block.window_size)
    windows = windows.view(-1, block.window_size * block.window_size, channels)
    mask = block.get_attn_mask(height_pad, width_pad, dtype=t.dtype, device=windows.device)
    outputs = block.attention(windows, mask, **kwargs)
    attended, weights = outputs[0], (outputs[1] if len(outputs) > 1 else None)
    if not v2:
        attended = block.dropout(attended)
    attended = attended.view(-1, block.window_size, block.window_size, channels)
    merged = module.window_reverse(attended, block.window_size, height_pad, width_pad)
    if v2 and block.shift_size > 0:
        merged = merged.roll((block.shift_size, block.shift_size), (1, 2))
    elif not v2:
        merged = block.cyclic_shift(merged, reverse=True)
    if pad_values[3] > 0 or pad_values[5] > 0:
        merged = merged[:, :height, :width, :].contiguous()
    return merged.view(batch_size, height * width, channels), weights


@register_adapter(swin.SwinLayer, swinv2.Swinv2Layer)
class HFSwin(HFAdapter):
    family = "Hugging Face Swin"

    @staticmethod
    def num_units(block):
        return 2 if isinstance(block, swinv2.Swinv2Layer) else 1

    @classmethod
    def residual(cls, block, unit, x, **call):
        if isinstance(block, swinv2.Swinv2Layer):
            return cls._residual_v2(block, unit, x, **call)
        return cls._residual_v1(block, x, **call)

    @staticmethod
    def _residual_v1(block, x, input_dimensions, always_partition=False, **kwargs):
        if not always_partition:
            block.set_shift_and_window_size(input_dimensions)
        attended, weights = _windowed_attention(block, block.layernorm_before(x), input_dimensions, False,
                                                **kwargs)
        block.__dict__[_WEIGHTS] = weights
        return attended

    @staticmethod
    def _residual_v2(block, unit, x, input_dimensions, output_attentions=False):
        if unit == 1:
            return block.layernorm_after(block.output(block.intermediate(x)))
        attended, weights = _windowed_attention(block, x, input_dimensions, True,
                                                output_attentions=output_attentions)
        block.__dict__[_WEIGHTS] = weights if output_attentions else None
        return block.layernorm_before(attended)

    @staticmethod
    def exit(block, x):
        weights = block.__dict__.pop(_WEIGHTS, None)
        if isinstance(block, swinv2.Swinv2Layer):
            return (x,) if weights is None else (x, weights)
        return x + block.dropout(block.mlp(block.layernorm_after(x))), weights

    @staticmethod
    def branch(block, unit):
        if isinstance(block, swinv2.Swinv2Layer):
            return ("attention", "layernorm_before") if unit == 0 else (
                "intermediate", "output", "layernorm_after")
        return ("layernorm_before", "attention")

    @staticmethod
    def fold_scale(block, unit, scale):
        if isinstance(block, swinv2.Swinv2Layer):  # post-norm: the norm is the branch's last layer
            scale_affine(block.layernorm_before if unit == 0 else block.layernorm_after, scale)
        else:
            scale_affine(block.attention.o_proj, scale)

    @classmethod
    def removed(cls, block):
        """None: a Swin layer returns HF's tuple, and Swin v1's ungated MLP stays when its unit is removed."""
        raise ValueError(f"{type(block).__name__}: {cls.family} has no plain form of a removed layer")
