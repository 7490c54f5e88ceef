"""Learned gates: L0 hard-concrete gates and sparse variational dropout, as mask-protocol gates.

Both are :class:`~secateurs.masking.Gate` parametrizations: the trained weight stays the same
``nn.Parameter``, the gate's own parameters (``log_alpha``, ``log_sigma2``) live in the model (so
build the optimizer *after* the Pruner), the report, ``bake``, ``unmask`` and ``save_masks`` speak
to them through the protocol, and :func:`gates_to_masks` turns them into binary masks. At
inference (``model.eval()``) both are deterministic.

- **L0 hard-concrete gates** (Louizos, Welling & Kingma 2018, arXiv:1712.01312): each gate is
  ``z = min(1, max(0, s * (zeta - gamma) + gamma))`` with ``s`` a binary-concrete sample of
  temperature ``beta`` (train) or ``sigmoid(log_alpha)`` (test), stretch ``(gamma, zeta) =
  (-0.1, 1.1)`` and ``beta = 2/3`` (the paper's values). The penalty is the expected L0 norm,
  ``sum_g |g| * sigmoid(log_alpha_g - beta * log(-gamma / zeta))`` (eq. 12), ``|g|`` the weights
  a gate controls. Granularities: ``'weight'`` (one gate per weight) and ``'neuron'`` (one gate per
  input unit of each layer: a Linear's input features, a Conv's input channels; the paper's group
  sparsity, which prunes the *previous* layer's neurons / channels). ``blocks={glob: k}`` makes a
  unit ``k`` consecutive input columns: the channels of a flattened conv map (``k = H*W``), or
  attention heads on an output projection (``k = head_dim``).
- **Sparse variational dropout** (Molchanov, Ashukha & Vetrov 2017, arXiv:1701.05369): a weight is
  ``w ~ N(theta, alpha * theta^2)`` with the additive reparameterisation (``theta`` and ``log
  sigma^2`` trained, ``log alpha = log sigma^2 - log theta^2``, clipped), sampled by the local
  reparameterisation trick (the pre-activations are drawn: ``b ~ N(x theta, x^2 sigma^2)``, a
  forward hook on the layer adds that noise), with the paper's approximation of the KL term
  (eq. 14, ``k1, k2, k3 = 0.63576, 1.87320, 1.48695``). At test time weights with ``log alpha``
  above the threshold (3) are zero.

The gates are attached by their regularizers (``regularizer='l0'`` / ``'sparse_vd'``) to the
weights in the Pruner's scope; removal is refused while they are attached
(``secateurs.bake(model)`` makes them permanent; then
:func:`~secateurs.training.remove_zero_groups` takes out the zeroed units).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StateError
from ..masking import Gate, WeightMask, attach, attach_gate, detach, gate_of, masked_targets
from ..scope import Target, matches
from ..spec import is_number
from .regularizers import Contribution, Regularizer, register_regularizer

# -- L0 hard-concrete gates -------------------------------------------------------------------------


class HardConcreteGate(Gate):
    """One hard-concrete gate per unit of a weight (Louizos et al. 2018).

    Args:
        shape: the weight's shape. ``dim=None``: a gate per weight; ``dim=1``: a gate per block of
            ``block`` consecutive input columns (input features / input channels).
    """

    def __init__(self, shape: Sequence[int], dim: int | None = None, block: int = 1, droprate_init: float = 0.5,
                 beta: float = 2 / 3, stretch: tuple[float, float] = (-0.1, 1.1)) -> None:  # fmt: skip
        super().__init__()
        self.shape, self.dim, self.block = tuple(shape), dim, block
        self.beta, (self.gamma, self.zeta) = beta, stretch
        if dim is None:
            units: tuple[int, ...] = self.shape
        else:
            if self.shape[dim] % block:
                raise ConfigError(f"blocks: {block} does not divide the {self.shape[dim]} input columns of {shape}")
            units = (self.shape[dim] // block,)
        mean = math.log(1 - droprate_init) - math.log(droprate_init)  # the paper's code: keep prob 1 - droprate
        self.log_alpha = nn.Parameter(torch.empty(units).normal_(mean, 1e-2))

    def _expand(self, z: Tensor) -> Tensor:
        """Unit values -> the weight's shape."""
        if self.dim is None:
            return z
        z = z.repeat_interleave(self.block)
        view = [1] * len(self.shape)
        view[self.dim] = -1
        return z.reshape(view)

    def deterministic(self) -> Tensor:
        """Test-time gates: ``min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self) -> Tensor:
        """Training-time gates (eq. 10): a stretched, clipped binary-concrete sample."""
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, weight: Tensor) -> Tensor:
        z = self.sample() if self.training else self.deterministic()
        return weight * self._expand(z).to(weight.dtype)

    def probability_nonzero(self) -> Tensor:
        """P(z != 0) per unit (eq. 12), differentiable in ``log_alpha``."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def unit_size(self) -> int:
        return 1 if self.dim is None else math.prod(self.shape) // self.log_alpha.numel()

    def keep(self) -> Tensor:
        return (self._expand(self.deterministic().detach()) > 0).expand(self.shape)

    def fold(self, weight: Tensor) -> Tensor:
        """The test-time weight ``weight * z`` (z in [0, 1]), so a baked model computes what the gated one did."""
        z = self._expand(self.deterministic().detach()).to(weight.device, weight.dtype)
        return torch.where(z > 0, weight * z, 0.0)


# -- sparse variational dropout -----------------------------------------------------------------------

K1, K2, K3 = 0.63576, 1.87320, 1.48695  # Molchanov et al. 2017, eq. 14

_LRT_OPS = {nn.Linear: F.linear, nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _lrt_op(module: nn.Module):
    for kind, op in _LRT_OPS.items():
        if isinstance(module, kind):
            return op
    return None


class VariationalDropoutGate(Gate):
    """Sparse variational dropout on one Linear / Conv weight (Molchanov et al. 2017)."""

    def __init__(
        self, weight: Tensor, threshold: float = 3.0, clip: float = 10.0, log_sigma2_init: float = -10.0
    ) -> None:
        super().__init__()
        self.threshold, self.clip = threshold, clip
        self.log_sigma2 = nn.Parameter(torch.full_like(weight.detach(), log_sigma2_init))
        self._theta: Tensor | None = None  # the weight of the current forward (for the noise hook)
        self._hooks: dict[int, Any] = {}

    def log_alpha(self, theta: Tensor) -> Tensor:
        """``log sigma^2 - log theta^2``, clipped to ``[-clip, clip]`` (additive reparameterisation)."""
        return (self.log_sigma2 - torch.log(theta.square() + 1e-8)).clamp(-self.clip, self.clip)

    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self._theta = weight  # the mean; the hook adds the local-reparameterisation noise
            return weight
        return torch.where(self.log_alpha(weight.detach()) < self.threshold, weight, 0.0)

    def keep(self) -> Tensor:
        theta = self._original()
        return self.log_alpha(theta.detach()) < self.threshold

    def _original(self) -> Tensor:
        if self._owner is None:
            raise StateError("this VariationalDropoutGate is not attached to a weight")
        return self._owner.parametrizations[self._param].original

    def install(self, module: nn.Module, param: str) -> None:
        """Add the noise hook on ``module`` (one per holder of the weight)."""
        if _lrt_op(module) is None:
            raise ConfigError(
                f"sparse variational dropout samples pre-activations with the local reparameterisation trick, which "
                f"needs nn.Linear or nn.Conv1d/2d/3d; got {type(module).__name__} (exclude it from the scope)"
            )
        if isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode != "zeros":
            raise ConfigError(f"sparse variational dropout supports padding_mode='zeros', not {module.padding_mode!r}")
        # plain attributes, not submodules: the layer already holds this gate (a cycle would recurse forever)
        self.__dict__["_owner"], self.__dict__["_param"] = module, param
        self._hooks[id(module)] = module.register_forward_hook(self._noise)

    _owner: nn.Module | None = None
    _param: str = "weight"

    def _noise(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.training or self._theta is None:
            return output
        theta, self._theta = self._theta, None
        variance_weight = torch.exp(self.log_alpha(theta)) * theta.square()  # sigma^2 = alpha * theta^2
        x = args[0]
        op = _lrt_op(module)
        if isinstance(module, nn.Linear):
            variance = op(x.square(), variance_weight)
        else:
            variance = op(x.square(), variance_weight, None, module.stride, module.padding, module.dilation,
                          module.groups)  # fmt: skip
        return output + torch.sqrt(variance + 1e-8) * torch.randn_like(output)

    def detached(self, module: nn.Module) -> None:
        handle = self._hooks.pop(id(module), None)
        if handle is not None:
            handle.remove()

    def negative_kl(self, theta: Tensor) -> Tensor:
        """The paper's approximation of -KL(q || log-uniform prior), per weight (eq. 14)."""
        log_alpha = self.log_alpha(theta)
        return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


# -- the regularizers that attach and train them ------------------------------------------------------


def _learned_gates(targets: Sequence[Target], kind: type[Gate]) -> list[tuple[Target, Gate]]:
    return [(t, g) for t in targets if isinstance(g := gate_of(t.module, t.param_name), kind)]


class _GateRegularizer(Regularizer):
    """Attach one gate per target in scope on bind (kept when bound again), train it by its penalty."""

    kind: type[Gate]

    def bind(self, model: nn.Module, targets: Sequence[Target], example_inputs: Any = None) -> None:
        targets = [t for t in targets if t.param_name == "weight"]
        if not targets:
            raise ConfigError(f"regularizer {self.name!r} gates the weights in scope, and the scope selects none")
        fresh = [t for t in targets if not isinstance(gate_of(t.module, t.param_name), self.kind)]
        for t in fresh:  # validate every target before the first gate goes on
            existing = gate_of(t.module, t.param_name)
            if existing is not None:
                raise StateError(f"{t.name} already carries a {type(existing).__name__}; secateurs.bake(model) or "
                                 "secateurs.unmask(model) first")  # fmt: skip
            self.check_target(t)
        for t in fresh:
            gate = self.make_gate(t)
            attach_gate(t, gate)
            for _, module, param in t.users:
                self.installed(gate, module, param)
        self._gated = _learned_gates(targets, self.kind)

    def check_target(self, target: Target) -> None:
        """Refuse a target the gate cannot act on (before anything is attached)."""

    def make_gate(self, target: Target) -> Gate:
        raise NotImplementedError

    def installed(self, gate: Gate, module: nn.Module, param: str) -> None:
        """After the gate is registered on one holder."""

    def _autograd(self, strength: float, value: Tensor, tensors: list[tuple[str, Tensor]]) -> tuple[float, list]:
        grads = torch.autograd.grad(strength * value, [t for _, t in tensors], allow_unused=True)
        parts = [(n, t, g.detach()) for (n, t), g in zip(tensors, grads, strict=True) if g is not None]
        return strength * float(value.detach()), parts


@register_regularizer
class L0Gates(_GateRegularizer):
    """L0 hard-concrete gates (Louizos et al. 2018, arXiv:1712.01312) on the weights in scope.

    Args:
        strength: lambda of the expected-L0 penalty (per weight a gate controls; the paper uses
            lambda = 1 / N on an objective summed over the data, i.e. its 0.1/N ... 1/N per-sample).
        granularity: ``'weight'`` or ``'neuron'`` (input features / input channels, see the module).
        blocks: ``{module glob: columns per unit}`` for ``'neuron'`` (flattened conv maps, heads).
        droprate_init: initial drop rate of the gates (the paper's code: 0.5; lower when fine-tuning).
        beta, stretch: the temperature and the stretch interval (2/3 and (-0.1, 1.1)).
    """

    name = "l0"
    kind = HardConcreteGate

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None,
                 granularity: str = "weight", blocks: Mapping[str, int] | None = None, droprate_init: float = 0.5,
                 beta: float = 2 / 3, stretch: Sequence[float] = (-0.1, 1.1)) -> None:  # fmt: skip
        super().__init__(strength, strength_schedule)
        if granularity not in ("weight", "neuron"):
            raise ConfigError(f"regularizer_options.granularity must be 'weight' or 'neuron', got {granularity!r}")
        if blocks is not None and (granularity != "neuron" or not isinstance(blocks, Mapping)
                                   or not all(isinstance(v, int) and v >= 1 for v in blocks.values())):  # fmt: skip
            raise ConfigError(f"regularizer_options.blocks is a {{glob: columns per unit >= 1}} dict for "
                              f"granularity='neuron', got {blocks!r}")  # fmt: skip
        if not (is_number(droprate_init) and 0 < droprate_init < 1):
            raise ConfigError(f"regularizer_options.droprate_init must be in (0, 1), got {droprate_init!r}")
        if not (is_number(beta) and beta > 0):
            raise ConfigError(f"regularizer_options.beta must be > 0, got {beta!r}")
        stretch = tuple(stretch)
        if len(stretch) != 2 or not (stretch[0] < 0 and stretch[1] > 1):
            raise ConfigError(f"regularizer_options.stretch must be (gamma < 0, zeta > 1), got {stretch!r}")
        self.granularity, self.blocks = granularity, dict(blocks or {})
        self.droprate_init, self.beta, self.stretch = float(droprate_init), float(beta), stretch

    def options(self) -> dict[str, Any]:
        out = super().options()
        out.update(granularity=self.granularity, droprate_init=self.droprate_init, beta=self.beta,
                   stretch=list(self.stretch))  # fmt: skip
        if self.blocks:
            out["blocks"] = dict(self.blocks)
        return out

    def _block(self, target: Target) -> int:
        block = 1
        for glob, size in self.blocks.items():
            if matches(target.module_name, [glob]):
                block = size
        return block

    def check_target(self, target: Target) -> None:
        if self.granularity == "neuron":
            shape = target.parameter.shape
            if len(shape) < 2 or shape[1] % self._block(target):
                raise ConfigError(f"{target.name}: shape {tuple(shape)} has no input dimension divisible into "
                                  f"blocks of {self._block(target)}")  # fmt: skip

    def make_gate(self, target: Target) -> Gate:
        dim = None if self.granularity == "weight" else 1
        gate = HardConcreteGate(target.parameter.shape, dim, self._block(target), self.droprate_init, self.beta,
                                self.stretch)  # fmt: skip
        return gate.to(target.parameter.device)

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        with torch.enable_grad():
            value = sum(g.probability_nonzero().sum() * g.unit_size() for _, g in self._gated)
            return self._autograd(strength, value, [(f"{t.name}.log_alpha", g.log_alpha) for t, g in self._gated])

    def group_norms(self) -> dict[str, Tensor]:
        return {t.name: g.deterministic().detach() for t, g in self._gated}


@register_regularizer
class SparseVariationalDropout(_GateRegularizer):
    """Sparse variational dropout (Molchanov et al. 2017, arXiv:1701.05369) on Linear / Conv weights in scope.

    Args:
        strength: the KL's weight per training example: ``1 / N`` for a training set of N examples and a
            loss averaged over the batch (the ELBO divided by N). Ramp it in with ``strength_schedule``
            (the paper trains with a KL warm-up when training from scratch).
        threshold: ``log alpha`` above which a weight is pruned (the paper's 3).
        clip: ``log alpha`` is clipped to ``[-clip, clip]``.
        log_sigma2_init: initial ``log sigma^2``.
    """

    name = "sparse_vd"
    kind = VariationalDropoutGate

    def __init__(self, strength: float = 1e-4, strength_schedule: Mapping[str, Any] | None = None,
                 threshold: float = 3.0, clip: float = 10.0, log_sigma2_init: float = -10.0) -> None:  # fmt: skip
        super().__init__(strength, strength_schedule)
        for key, value in (("threshold", threshold), ("clip", clip), ("log_sigma2_init", log_sigma2_init)):
            if not is_number(value) or not math.isfinite(value):
                raise ConfigError(f"regularizer_options.{key} must be a finite number, got {value!r}")
        if not clip > 0:
            raise ConfigError(f"regularizer_options.clip must be > 0, got {clip!r}")
        self.threshold, self.clip, self.log_sigma2_init = float(threshold), float(clip), float(log_sigma2_init)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "threshold": self.threshold, "clip": self.clip,
                "log_sigma2_init": self.log_sigma2_init}  # fmt: skip

    def check_target(self, target: Target) -> None:
        for _, module, _ in target.users:
            if _lrt_op(module) is None:
                raise ConfigError(
                    f"sparse variational dropout needs nn.Linear or nn.Conv1d/2d/3d (local reparameterisation trick); "
                    f"{target.name} is in a {type(module).__name__}: exclude it from the scope"
                )

    def make_gate(self, target: Target) -> Gate:
        return VariationalDropoutGate(target.parameter, self.threshold, self.clip, self.log_sigma2_init)

    def installed(self, gate: Gate, module: nn.Module, param: str) -> None:
        gate.install(module, param)  # type: ignore[attr-defined]

    def contributions(self, strength: float) -> tuple[float, list[Contribution]]:
        with torch.enable_grad():
            tensors, value = [], 0.0
            for t, g in self._gated:
                theta = t.parameter
                value = value - g.negative_kl(theta).sum()
                tensors += [(t.name, theta), (f"{t.name}.log_sigma2", g.log_sigma2)]
            return self._autograd(strength, value, tensors)

    def group_norms(self) -> dict[str, Tensor]:
        return {t.name: torch.where(g.keep(), t.parameter.detach().abs(), 0.0) for t, g in self._gated}


# -- conversion ------------------------------------------------------------------------------------


def gates_to_masks(model: nn.Module) -> int:
    """Turn every learned gate (L0, variational dropout, ...) into a binary mask, keeping the test-time
    outputs: what a gate scales (L0's ``z`` in (0, 1)) is written into the weight, then the gate is
    replaced by a :class:`~secateurs.masking.WeightMask` of what it keeps. Returns how many were
    converted. ``secateurs.bake(model)`` instead folds them into plain weights in one go."""
    converted = 0
    for target in masked_targets(model):
        gate = gate_of(target.module, target.param_name)
        if gate is None or isinstance(gate, WeightMask):
            continue
        with torch.no_grad():
            keep = gate.keep().detach().clone()
            folded = gate.fold(target.parameter.detach())
        detach(target, bake=False)
        with torch.no_grad():
            target.parameter.copy_(folded)
        attach(target, keep)
        converted += 1
    return converted
