"""Second-order criteria: OBD (diagonal Fisher) and SparseGPT's OBS saliency (layer Hessian)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..evidence import Evidence, Need, check_hessian_target
from ..hessian import check_dampening
from ..scope import Target
from .base import Criterion, grad3, register, weight3


@register
class OBD(Criterion):
    """Optimal Brain Damage (LeCun et al. 1990): the loss increase from zeroing w is
    about ``0.5 * H_ww * w^2``. The diagonal Hessian is approximated by the empirical
    diagonal Fisher, the mean of squared batch gradients (as in Theis et al. 2018,
    arXiv:1801.05787)."""

    name = "obd"
    needs = frozenset({Need.GRADIENTS})

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        return 0.5 * weight3(target).double().square() * grad3(evidence, target, "fisher")


@register
class SparseGPT(Criterion):
    """SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): OBS saliency ``w_q^2 / [H^-1]_qq`` with
    the layer Hessian ``H = 2 X X^T`` of calibration inputs, and OBS reconstruction.

    Its default mode is ``reconstruct`` with the ``sparsegpt`` solver, which re-scores the weights
    column block by column block as it updates them (the paper's adaptive mask selection,
    section 3.4). In ``mask`` / ``bake`` mode the saliency is computed once on the dense weights
    (OBS pruning without the update). Works on any Linear / Conv1D / Conv layer (a conv through
    its unfolded input patches, as OBC does)."""

    name = "sparsegpt"
    needs = frozenset({Need.HESSIAN})
    modes = ("mask", "bake", "reconstruct")
    default_mode = "reconstruct"
    default_solver = "sparsegpt"
    adaptive = True
    scores_embeddings = False

    def __init__(self, dampening: float = 0.01) -> None:
        check_dampening("method_options.dampening", dampening)
        self.dampening = float(dampening)

    def validate(self, targets: list[Target]) -> None:
        for t in targets:
            check_hessian_target(t)

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        # one factor per conv group; a Hessian shared by q/k/v is factored once, and raised dampening is reported
        factors = evidence.inverse_factors(target, self.dampening)
        w = weight3(target).double()
        out, spatial, inp = w.shape
        saliency_scale = []
        for inverse in factors:
            upper = inverse.factor.double()
            # 1 / diag(H^-1), with diag(H^-1) = diag(U^T U); an input that was always 0 counts for nothing
            saliency_scale.append((1.0 / upper.square().sum(0)).masked_fill(inverse.dead, 0.0))
        scale = torch.stack(saliency_scale)  # (groups, S*I)
        rows = scale.repeat_interleave(out // len(saliency_scale), dim=0).reshape(out, spatial, inp)
        return w.square() * rows.to(w.device)


@register
class ALPS(Criterion):
    """ALPS (Meng et al. 2024, arXiv:2406.07831): the layer-wise pruning problem with the Hessian
    ``H = 2 X X^T`` solved by ADMM with a penalty schedule, then conjugate gradients on the support.

    Only ``reconstruct`` mode: the ``alps`` solver chooses the support as it solves (the ADMM's
    projection) and writes the weights. Its starting support, and this score, is the largest
    ``w^2 * H_jj`` (the weights in the unit-diagonal coordinates the solver works in). Works on any
    Linear / Conv1D / Conv layer, element or N:M."""

    name = "alps"
    needs = frozenset({Need.HESSIAN})
    modes = ("reconstruct",)
    patterns = ("element", "n:m")
    default_mode = "reconstruct"
    default_solver = "alps"
    adaptive = True
    scores_embeddings = False

    def validate(self, targets: list[Target]) -> None:
        for t in targets:
            check_hessian_target(t)

    def score(self, target: Target, evidence: Evidence) -> Tensor:
        h = evidence.hessian(target).hessian
        diagonal = torch.diagonal(h, dim1=-2, dim2=-1).double()  # (groups, S*I) or (S*I,)
        w = weight3(target).double()
        out, spatial, inp = w.shape
        rows = diagonal.reshape(-1, spatial * inp).repeat_interleave(
            out // diagonal.reshape(-1, spatial * inp).shape[0], 0
        )
        return w.square() * rows.reshape(out, spatial, inp).to(w.device)
