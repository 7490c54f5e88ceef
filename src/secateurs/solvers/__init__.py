"""Solvers: the ``reconstruct`` application mode (and compensation after removal), which update the
surviving weights. Hessian accumulation and dampening are shared in :mod:`.hessian`."""

from __future__ import annotations

from ..hessian import CholeskyError, HessianAccumulator, InverseFactor, inverse_factor
from .alps import ALPSSolver, alps
from .base import SOLVERS, Solver, SolveResult, make_solver, register_solver
from .compensation import BiasCompensation
from .sparsegpt import SparseGPTSolver, sparsegpt
from .subspace import SubspaceReconstruction

__all__ = [
    "SOLVERS",
    "ALPSSolver",
    "BiasCompensation",
    "CholeskyError",
    "HessianAccumulator",
    "InverseFactor",
    "SolveResult",
    "Solver",
    "SparseGPTSolver",
    "SubspaceReconstruction",
    "alps",
    "inverse_factor",
    "make_solver",
    "register_solver",
    "sparsegpt",
]
