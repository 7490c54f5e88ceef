"""Batch-1 sparse-input GEMV: a Linear layer that reads only the weight rows of its non-zero inputs.

At batch 1 (decoding), a Linear layer on a CPU is bound by reading its weights from memory:
``y = W x`` touches every one of the ``out x in`` weights once. When a fraction ``s`` of ``x`` is
zero, the columns of ``W`` those inputs multiply contribute nothing, so a kernel that skips them
reads ``(1 - s)`` of the bytes: the physical limit of the speed-up is ``1 / (1 - s)``.

The layout is made for it: the weight is kept as ``W^T`` contiguous (``[in, out]``, i.e. the
Parameter ``W`` stored column-major, same tensor, same state_dict), so every active input is one
contiguous row of ``out`` floats. Each thread owns a contiguous range of outputs and streams the
active rows' slices into an accumulator that stays in L1 (TEAL, Liu et al. 2024,
arXiv:2408.14690, section 4.3 does the same on GPUs with a Triton kernel).

The compiled kernel is a C++ extension built on first use with ``torch.utils.cpp_extension`` and
OpenMP, cached in the user's cache directory (``$XDG_CACHE_HOME/secateurs/kernels``). Where it
cannot be built (no compiler, no ninja, another platform) or it fails its self-check against the
reference, one warning says so and :func:`reference` (``index_select`` of the active rows and a
matmul, pure PyTorch) computes the same result, just not as fast. ``SECATEURS_KERNEL=off`` skips
the build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SecateursWarning

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>

// y = bias + sum over i with |x[i]| > threshold of x[i] * wt[i, :]; wt is [in, out] contiguous.
torch::Tensor sparse_input_gemv(torch::Tensor x, torch::Tensor wt, double threshold,
                                c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && wt.dtype() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && wt.is_contiguous() && wt.dim() == 2 && x.numel() == wt.size(0),
              "x must be [in] and wt [in, out], both contiguous");
  const int64_t in = wt.size(0), out = wt.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float t = static_cast<float>(threshold);
  std::vector<int64_t> rows;
  std::vector<float> vals;
  rows.reserve(in);
  vals.reserve(in);
  for (int64_t i = 0; i < in; ++i) {
    const float v = xp[i];
    if (std::fabs(v) > t) { rows.push_back(i); vals.push_back(v); }
  }
  torch::Tensor y = bias.has_value() ? bias->to(torch::kFloat32).contiguous().clone() : torch::zeros({out}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t n = static_cast<int64_t>(rows.size());
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(out / 64)));
  #pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t span = (out + nt - 1) / nt;
    span = (span + 15) / 16 * 16;  // 64-byte aligned slices
    const int64_t j0 = std::min<int64_t>(out, tid * span), j1 = std::min<int64_t>(out, j0 + span);
    const int64_t w = j1 - j0;
    std::vector<float> acc(w > 0 ? w : 1, 0.0f);
    float* a = acc.data();
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {  // four rows per pass: one load/store of the accumulator per four rows
      const float a0 = vals[k], a1 = vals[k + 1], a2 = vals[k + 2], a3 = vals[k + 3];
      const float* r0 = wp + rows[k] * out + j0;
      const float* r1 = wp + rows[k + 1] * out + j0;
      const float* r2 = wp + rows[k + 2] * out + j0;
      const float* r3 = wp + rows[k + 3] * out + j0;
      #pragma omp simd
      for (int64_t j = 0; j < w; ++j) a[j] += a0 * r0[j] + a1 * r1[j] + a2 * r2[j] + a3 * r3[j];
    }
    for (; k < n; ++k) {
      const float a0 = vals[k];
      const float* r0 = wp + rows[k] * out + j0;
      #pragma omp simd
      for (int64_t j = 0; j < w; ++j) a[j] += a0 * r0[j];
    }
    for (int64_t j = 0; j < w; ++j) yp[j0 + j] += a[j];
  }
  return y;
}
"""  # noqa: E501

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "module": the built extension or None; "notice": why not


def cache_dir() -> Path:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/secateurs/kernels`` (``~/.cache/...``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "secateurs" / "kernels"


def _build_name() -> str:
    # -march=native: a cache shared by machines of another CPU must not hand out this build
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line
                break
    except OSError:
        pass
    digest = hashlib.sha256(f"{_SOURCE}{torch.__version__}{cpu}".encode()).hexdigest()[:12]
    return f"secateurs_sparse_gemv_{digest}"


def compiled() -> Any | None:
    """The compiled extension, built on first call; None (after one warning) where it cannot be."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["notice"] = _build()
            if _state["notice"]:
                warnings.warn(_state["notice"], SecateursWarning, stacklevel=3)
        return _state["module"]


def kernel_notice() -> str | None:
    """Why the compiled kernel is not used (None when it is, or was not asked for yet)."""
    return _state.get("notice")


def _build() -> tuple[Any | None, str | None]:
    if os.environ.get("SECATEURS_KERNEL", "").lower() in ("off", "0", "reference"):
        return None, None
    try:
        from torch.utils.cpp_extension import load_inline

        directory = cache_dir() / _build_name()
        directory.mkdir(parents=True, exist_ok=True)
        module = load_inline(
            name=_build_name(),
            cpp_sources=[_SOURCE],
            functions=["sparse_input_gemv"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as exc:  # any failure to build is a notice, never a crash
        reason = " ".join(str(exc).split())[:200]
        return None, f"secateurs: the sparse-input kernel could not be built ({reason}); using the PyTorch reference"
    problem = _self_check(module)
    if problem:
        return None, f"secateurs: the built sparse-input kernel failed its self-check ({problem}); using the reference"
    return module, None


def _self_check(module: Any) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for n_in, n_out in ((37, 5), (130, 300), (64, 1000)):
        x = torch.randn(n_in, generator=generator)
        wt = torch.randn(n_in, n_out, generator=generator)
        bias = torch.randn(n_out, generator=generator)
        try:
            got = module.sparse_input_gemv(x, wt, 0.5, bias)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        want = reference(x, wt, 0.5, bias)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            return f"max error {float((got - want).abs().max()):.3g} on a {n_in}x{n_out} problem"
    return None


def reference(x: Tensor, weight_t: Tensor, threshold: float, bias: Tensor | None) -> Tensor:
    """The same product in pure PyTorch: gather the active rows of ``W^T`` and multiply (one sample)."""
    active = (x.abs() > threshold).nonzero().squeeze(1)
    y = x.index_select(0, active) @ weight_t.index_select(0, active)
    return y if bias is None else y + bias


def thresholded_linear(x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """What every path computes: ``F.linear`` on ``x`` with entries ``|x| <= threshold`` set to zero."""
    return F.linear(torch.where(x.abs() > threshold, x, 0.0), weight, bias)


def sparse_input_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, threshold: float, use_kernel: bool = True
) -> Tensor:
    """``thresholded_linear`` for any ``x``, reading only active weight rows for a single float32 CPU sample.

    The sparse paths need ``weight`` stored column-major (``weight.t()`` contiguous, see
    :func:`to_input_major`); other layouts, batches of several rows, other dtypes and devices, and
    anything that needs a gradient take the dense path on the thresholded input.
    """
    n_out, n_in = weight.shape
    single = x.numel() == n_in
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    weight_t = weight.t()
    if not single or needs_grad or x.device.type != "cpu" or not weight_t.is_contiguous():
        return thresholded_linear(x, weight, bias, threshold)
    flat = x.reshape(n_in)
    if x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32) and use_kernel:
        module = compiled()
        if module is not None:
            return module.sparse_input_gemv(flat.contiguous(), weight_t, float(threshold), bias).view(
                *x.shape[:-1], n_out
            )
    return reference(flat, weight_t, threshold, bias).view(*x.shape[:-1], n_out)


def to_input_major(weight: Tensor) -> None:
    """Store ``weight`` (``[out, in]``) column-major in place: same Parameter, same values and shape,
    ``weight.t()`` contiguous, so each input's weights are one contiguous row for the kernel."""
    if not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def to_output_major(weight: Tensor) -> None:
    """Undo :func:`to_input_major`: the usual row-major storage."""
    if not weight.is_contiguous():
        weight.data = weight.data.contiguous()
