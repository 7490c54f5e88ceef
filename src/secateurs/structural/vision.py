"""torchvision classification models: the modules the generic tracing does not cover.

torchvision is never imported here: handlers are registered by class name and only match
models that already use it (as :mod:`.hf` does for transformers).

- ``LayerNorm2d`` (ConvNeXt) is an ``nn.LayerNorm`` applied to NCHW tensors: it permutes the
  channels last, normalises and permutes back, so its parameters follow axis 1 of its input,
  not the last axis as for the ``nn.LayerNorm`` it subclasses.
- ShuffleNet v2's ``InvertedResidual`` ends with a channel shuffle (a ``view`` that splits the
  channel axis in two): its handler writes the shuffle's channel classes, branches traced as usual.
- ``VisionTransformer`` reshapes the patch embedding with ``self.hidden_dim``: traced through
  like any module, but after a cut that attribute must follow ``conv_proj``'s output width
  (a size sync, :func:`.sizes.register_sizes`).
- Swin's ``ShiftedWindowAttention`` (v1 and v2, ``C // num_heads``) and MaxViT's
  ``RelativePositionalMultiHeadAttention`` (``reshape(B, G, P, D)`` of the heads' output) derive
  their head width from their input width, so neither their inner q/k/v width nor the residual
  stream feeding them can shrink: their handler keeps both (frozen, with that reason) and the
  MLPs and convolutions between attentions are what ``pattern="channel"`` removes.
"""

from __future__ import annotations

import torch

from .handlers import Handler, first_input, pass_through, register_handler_by_name
from .sizes import register_sizes

TORCHVISION = "torchvision.models"


class LayerNorm2dHandler(Handler):
    """torchvision's ``LayerNorm2d``: per-channel affine on axis 1 (statistics over channels, so,
    as for every LayerNorm, removing a channel changes the statistics of the others)."""

    name = "layer_norm2d"

    def trace(self, t, name, module, args, kwargs, output):
        params = [p for p in ("weight", "bias") if getattr(module, p, None) is not None]
        pass_through(t, name, first_input(args, kwargs), output, 1, params or ["#features"])

    def update(self, module, name, edit, kept):
        edit.set(module, "normalized_shape", (next(iter(kept.values())),))


class WidthTiedAttentionHandler(Handler):
    """Window attention whose code derives the head width from its input width (Swin's
    ``shifted_window_attention``: ``C // num_heads``; MaxViT's ``reshape(B, G, P, D)`` of the heads'
    output): its input channels and its inner q/k/v width cannot change, so both are kept (frozen,
    with this reason) and the channels around it (MLPs, convolutions) stay removable."""

    name = "width_tied_attention"

    def trace(self, t, name, module, args, kwargs, output):
        vec = t.channel(first_input(args, kwargs), -1)
        t.pin(vec, f"{t.where()} derives its head width from its input width; its input channels stay")
        t.label(output, -1, vec)  # the output is added back to the (kept) residual stream


class ChannelShuffleBlockHandler(Handler):
    """ShuffleNet v2's ``InvertedResidual``: ``cat`` of two branches, then ``channel_shuffle(out, 2)``,
    whose ``view(B, 2, C / 2, H, W)`` splits the channel axis (blocked by the generic rules). The
    handler re-runs the branches, so the generic tracing follows them (the stride-1 ``chunk`` ties
    its halves), and writes the shuffle itself: channel k of each half goes with channel k of the
    other (tied: the shuffle interleaves them pairwise, so both halves must lose the same
    positions), output position ``2k + i`` is half i's channel k."""

    name = "channel_shuffle_block"

    def trace(self, t, name, module, args, kwargs, output):
        x = first_input(args, kwargs)
        if module.stride == 1:
            left, right = x.chunk(2, dim=1)
            right = module.branch2(right)
        else:
            left, right = module.branch1(x), module.branch2(x)
        a, b = t.channel(left, 1), t.channel(right, 1)
        t.couple(a, b)
        t.label(output, 1, torch.stack([a, b], 1).reshape(-1))


def _vit_hidden_dim(module, edit) -> None:
    edit.set(module, "hidden_dim", module.conv_proj.out_channels)


register_handler_by_name(f"{TORCHVISION}.convnext.LayerNorm2d", LayerNorm2dHandler())
register_sizes(f"{TORCHVISION}.vision_transformer.VisionTransformer", _vit_hidden_dim)
register_handler_by_name(f"{TORCHVISION}.shufflenetv2.InvertedResidual", ChannelShuffleBlockHandler())
for _attention in ("swin_transformer.ShiftedWindowAttention", "maxvit.RelativePositionalMultiHeadAttention"):
    register_handler_by_name(f"{TORCHVISION}.{_attention}", WidthTiedAttentionHandler())
