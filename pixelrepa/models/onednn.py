"""Float32 linear layers on the CPU through oneDNN's GEMM (issue 7, CPU fast path).

torch sends a float32 `F.linear` on the CPU to MKL's sgemm, which runs AVX2 code on AMD
CPUs; oneDNN (bundled with torch, used by inductor for frozen inference graphs) picks the
AVX-512 kernels there and is about 2x faster for every GEMM of a training step (forward,
input gradient, weight gradient). On Intel CPUs MKL takes its AVX-512 path itself and oneDNN
gains nothing (0.93-1.12x measured), so `cpu_linear="auto"` uses it on AMD CPUs only. The
function is the same float32 product; only the summation order differs (relative
differences around 1e-6).

`use_onednn_linears(module)` switches every `nn.Linear` of a module in place (an
instance-level `forward`, so parameter names and state-dict keys stay the same). The
model code does not know about it: the trainer and the sampler apply it from outside,
as chosen by `KernelConfig.cpu_linear`.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Below this many multiply-adds (the per-sample conditioning MLPs), oneDNN's per-call overhead
# outweighs its faster kernel on the CPU (measured forward + backward on one core).
_MIN_MACS = 1 << 20


def _mkldnn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T (+ bias) through oneDNN; x is (..., K), weight (N, K), any strides."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _linear_grads(linear: Callable[[Tensor, Tensor, Tensor | None], Tensor], x: Tensor, weight: Tensor,
                  has_bias: bool, needs: tuple[bool, ...], grad: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of x @ weight.T + bias with the matmuls done by `linear`."""
    grad2d = grad.reshape(-1, grad.shape[-1])  # (M, out)
    grad_x = linear(grad, weight.t(), None) if needs[0] else None  # (..., in) = grad @ W
    grad_w = linear(grad2d.t(), x.reshape(-1, x.shape[-1]).t(), None) if needs[1] else None  # grad^T @ x
    grad_b = grad2d.sum(0) if has_bias and needs[2] else None
    return grad_x, grad_w, grad_b


class _EagerLinear(torch.autograd.Function):
    """The eager path: an autograd.Function has less per-call overhead than a custom op."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _mkldnn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return _linear_grads(_mkldnn_linear, x, weight, ctx.has_bias, ctx.needs_input_grad, grad)


@torch.library.custom_op("pixelrepa::onednn_linear", mutates_args=())
def _compiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The same product as a custom op, so that torch.compile keeps it as one opaque call
    (inductor would otherwise lower the oneDNN op, which it supports for frozen weights only)."""
    return _mkldnn_linear(x, weight, bias)


@_compiled_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _compiled_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    return _linear_grads(_compiled_linear, x, weight, ctx.has_bias, ctx.needs_input_grad, grad)


_compiled_linear.register_autograd(_compiled_backward, setup_context=_setup_context)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear for float32 CPU tensors through oneDNN; anything else (other devices or
    dtypes, CPU autocast, products too small to gain) goes to F.linear."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or x.numel() * weight.shape[0] < _MIN_MACS):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias)
    return _EagerLinear.apply(x, weight, bias)


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Route every nn.Linear inside `module` through oneDNN; returns how many. A no-op
    (returning 0) where torch was built without oneDNN."""
    if not onednn_available():
        return 0
    linears = [sub for sub in module.modules() if isinstance(sub, nn.Linear)]
    for linear in linears:
        linear.forward = types.MethodType(_forward, linear)
    return len(linears)
