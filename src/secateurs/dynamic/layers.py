"""The modules that carry activation sparsity: a Linear that thresholds its input, an activation that
thresholds its output (CATS), and how they replace the model's own modules and are taken out again.

Both keep the original module's Parameters (the same tensor objects) and add only non-persistent
state, so the model's ``state_dict`` keys and values are unchanged: the thresholds travel in their
own file (:mod:`secateurs.dynamic.saving`). A threshold of ``None`` is the dense module, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .kernel import sparse_input_linear, to_input_major, to_output_major

#: activation modules CATS can threshold (Lee et al. 2024, arXiv:2404.08763: the MLP's gate activation)
ACTIVATIONS = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Mish)


class DynamicLinear(nn.Linear):
    """``nn.Linear`` whose input entries with ``|x| <= threshold`` are zero (TEAL).

    ``threshold = None``: the dense layer (``F.linear``, bit for bit). A single float32 sample on
    the CPU (batch-1 decoding) goes through the sparse-input kernel when ``use_kernel`` is set and
    the weight is stored input-major (:func:`~secateurs.dynamic.kernel.to_input_major`).
    """

    use_kernel: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, name: str, use_kernel: bool) -> DynamicLinear:
        if parametrize.is_parametrized(linear):
            raise ConfigError(
                f"{name} carries a mask or gate (a parametrization); make it permanent with secateurs.bake(model) "
                "before adding activation sparsity"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight
        module.bias = linear.bias
        module.use_kernel, module._threshold = use_kernel, None
        module.training = linear.training
        return module

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        """A thresholded layer with the kernel stores its weight input-major; a dense one (None) keeps the
        usual row-major storage, so that its output is the dense model's bit for bit (BLAS sums in
        another order on the other layout)."""
        self._threshold = None if value is None else float(value)
        if self.use_kernel and self.weight.device.type == "cpu":
            (to_output_major if value is None else to_input_major)(self.weight)

    def unwrap(self) -> nn.Linear:
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        to_output_major(self.weight)
        linear.weight, linear.bias = self.weight, self.bias
        linear.training = self.training
        return linear

    def forward(self, x: Tensor) -> Tensor:
        if self.threshold is None:
            return F.linear(x, self.weight, self.bias)
        return sparse_input_linear(x, self.weight, self.bias, self.threshold, self.use_kernel)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


class DynamicActivation(nn.Module):
    """An activation whose outputs with ``|a| <= threshold`` are zero (CATS' gate activation)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation
        self.threshold: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(x)
        if self.threshold is None:
            return out
        return torch.where(out.abs() > self.threshold, out, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
