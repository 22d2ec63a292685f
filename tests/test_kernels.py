"""Fast paths against the reference path (issue 7): same function to float32 tolerance."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from pixelrepa.align.encoders import build_encoder
from pixelrepa.config import REFERENCE_PATH, KernelConfig, get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.models.onednn import onednn_available, onednn_linear, use_onednn_linears
from pixelrepa.objective import draw_randomness
from pixelrepa.sampling import sample
from pixelrepa import device as device_module
from pixelrepa.device import (
    apply_kernels,
    kernels_for_run,
    prepare_encoder,
    resolve_compile,
    resolve_cpu_linear,
)
from pixelrepa.training.module import TrainingModule
from pixelrepa.distributed import World
from pixelrepa.training.parallel import wrap_for_training
from pixelrepa.training.optim import make_optimizer

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# The reference path as it runs on a CPU: the released code's per-block compile is for GPUs.
CPU_REFERENCE = {**REFERENCE_PATH, "kernels.compile": "none"}
# Micro/8 images give 16 + 4 tokens of width 64: at this batch the token-wise linears are above
# the size from which the oneDNN kernel is used.
BATCH = 16


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> None:
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"relative difference {((a - b).abs().max() / scale).item():.2e}"


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_and_its_gradients(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 96, generator=g).transpose(0, 1)  # non-contiguous (70, 3, 96)
    w = torch.randn(64, 96, generator=g)  # 70 * 3 * 96 * 64 multiply-adds: above the oneDNN threshold
    b = torch.randn(64, generator=g) if bias else None
    grad = torch.randn(70, 3, 64, generator=g)
    outs, grads = [], []
    for fn in (onednn_linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        out = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        out.backward(grad)
        outs.append(out.detach())
        grads.append([leaf.grad for leaf in leaves])
    assert_close(outs[0], outs[1])
    for fast, ref in zip(*grads):
        assert_close(fast, ref)


@needs_onednn
def test_use_onednn_linears_keeps_names_and_outputs():
    net = randomize_(JiT(get_preset("JiT-Micro/8").model), seed=1).eval()
    keys = list(net.state_dict())
    n = BATCH
    z, t, y = torch.randn(n, 3, 32, 32), torch.rand(n), torch.arange(n) % 11
    with torch.no_grad():
        before = net(z, t, y)
        assert use_onednn_linears(net) > 0
        after = net(z, t, y)
    assert list(net.state_dict()) == keys
    assert_close(after, before)


@needs_onednn
@pytest.mark.parametrize("vendor, chosen", [("AuthenticAMD", "onednn"), ("GenuineIntel", "aten"), ("", "aten")])
def test_cpu_linear_auto_takes_onednn_only_on_amd(monkeypatch, vendor, chosen):
    monkeypatch.setattr(device_module, "cpu_vendor", lambda: vendor)
    assert resolve_cpu_linear(KernelConfig()) == chosen
    assert resolve_cpu_linear(KernelConfig(cpu_linear="onednn")) == "onednn"
    assert resolve_cpu_linear(KernelConfig(cpu_linear="aten")) == "aten"
    net = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.Linear(4096, 256))
    apply_kernels(net, [], KernelConfig(compile="none"), torch.device("cpu"))
    assert all("forward" in vars(layer) for layer in net) == (chosen == "onednn")
    with pytest.raises(ValueError, match="cpu_linear"):
        KernelConfig(cpu_linear="mkl")


def test_compile_resolution(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_module, "cpp_compiler_found", lambda: True)
    assert resolve_compile(KernelConfig(), gpu) == "model"
    assert resolve_compile(KernelConfig(), gpu, train_steps=10) == "model"
    assert resolve_compile(KernelConfig(compile="blocks"), cpu) == "blocks"
    assert resolve_compile(KernelConfig(compile="none"), cpu, train_steps=10**6) == "none"
    # On the CPU 'auto' compiles training runs from cpu_compile_min_steps on, nothing else.
    assert resolve_compile(KernelConfig(), cpu) == "none"
    assert resolve_compile(KernelConfig(), cpu, train_steps=1999) == "none"
    assert resolve_compile(KernelConfig(), cpu, train_steps=2000) == "model"
    assert resolve_compile(KernelConfig(cpu_compile_min_steps=10), cpu, train_steps=10) == "model"
    assert kernels_for_run(KernelConfig(), cpu, 2000) == KernelConfig(compile="model")
    assert kernels_for_run(KernelConfig(), cpu, None) == KernelConfig(compile="none")
    # ... and only where inductor can build its C++ code.
    monkeypatch.setattr(device_module, "cpp_compiler_found", lambda: False)
    assert resolve_compile(KernelConfig(), cpu, train_steps=10**6) == "none"
    assert resolve_compile(KernelConfig(compile="model"), cpu) == "model"
    with pytest.raises(ValueError, match="cpu_compile_min_steps"):
        KernelConfig(cpu_compile_min_steps=-1)


def test_cpp_compiler_lookup_follows_cxx(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-pixelrepa")
    assert not device_module.cpp_compiler_found()
    monkeypatch.setenv("CXX", sys.executable)  # any executable on disk stands in for a compiler
    assert device_module.cpp_compiler_found()


@pytest.mark.skipif(not os.environ.get("PIXELREPA_COMPILE_TESTS"),
                    reason="compiles for about a minute; set PIXELREPA_COMPILE_TESTS=1")
def test_compiled_model_with_onednn_linears_equals_eager_reference():
    """kernels.compile='model' (inductor around the oneDNN custom op) against eager BLAS."""
    config = get_preset("PixelREPA-Micro/8")
    g = torch.Generator().manual_seed(3)
    m = config.model
    x = torch.rand(BATCH, 3, m.input_size, m.input_size, generator=g) * 2 - 1
    y = torch.randint(0, m.num_classes, (BATCH,), generator=g)
    draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align, g)
    target = torch.randn(BATCH, m.num_patches, config.align.encoder.feature_dim, generator=g)
    results = []
    for kernels in (KernelConfig(compile="none", cpu_linear="aten"), KernelConfig(compile="model")):
        module = randomize_(TrainingModule(config), seed=2)
        apply_kernels(module, module.net.blocks, kernels, torch.device("cpu"))
        loss = module(x, draws, target)["total"]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in module.parameters() if p.grad is not None]))
    (ref_loss, ref_grads), (loss, grads) = results
    assert_close(loss, ref_loss, rtol=1e-5)
    for fast, ref in zip(grads, ref_grads):
        assert_close(fast, ref, rtol=5e-5)


def _train_step(overrides: dict) -> tuple[dict[str, float], list[torch.Tensor]]:
    """One PixelREPA-Micro/8 step through the trainer's wrapper and optimizer: the losses and
    the updated parameters."""
    config = get_preset("PixelREPA-Micro/8").replace(**overrides)
    module = randomize_(TrainingModule(config), seed=2)
    wrapped = wrap_for_training(module, "ddp", CPU, kernels=config.kernels)
    optimizer = make_optimizer(wrapped, config)
    g = torch.Generator().manual_seed(3)
    m = config.model
    x = torch.rand(BATCH, 3, m.input_size, m.input_size, generator=g) * 2 - 1
    y = torch.randint(0, m.num_classes, (BATCH,), generator=g)
    draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align, g)
    target = torch.randn(BATCH, m.num_patches, config.align.encoder.feature_dim, generator=g)
    losses = wrapped(x, draws, target)
    losses["total"].backward()
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}, [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("attention", ["auto", "sdpa"])  # on the CPU 'auto' is the explicit form
def test_training_step_fast_equals_reference(attention):
    fast_losses, fast_params = _train_step({"kernels.attention": attention})
    ref_losses, ref_params = _train_step(CPU_REFERENCE)
    for name in ref_losses:
        assert fast_losses[name] == pytest.approx(ref_losses[name], rel=1e-5)
    for fast, ref in zip(fast_params, ref_params):
        assert_close(fast, ref, rtol=1e-5)


def test_sampling_fast_equals_reference():
    config = get_preset("JiT-Micro/8").replace(**{"sampler.steps": 4})
    reference = config.replace(**CPU_REFERENCE)
    net = randomize_(JiT(config.model), seed=4).eval()
    g = torch.Generator().manual_seed(5)
    noise, labels = torch.randn(BATCH, 3, 32, 32, generator=g), torch.arange(BATCH) % 10
    ref = sample(net, noise, labels, 10, reference.sampler)
    use_onednn_linears(net)  # after the reference run: the fast net differs only in its kernels
    fast = sample(net, noise, labels, 10, config.sampler)
    assert_close(fast, ref)
    unguided_too = sample(net, noise, labels, 10, dataclasses.replace(config.sampler, skip_unguided=False))
    assert_close(unguided_too, fast)


def test_prepared_encoder_is_channels_last_and_computes_the_same_targets():
    """The trainer's encoder (channels-last weights, oneDNN linears) against the plain one."""
    config = get_preset("PixelREPA-Micro/8")
    torch.manual_seed(0)
    plain = build_encoder(config.align.encoder, random_init=True)
    prepared = build_encoder(config.align.encoder, random_init=True)
    prepared.load_state_dict(plain.state_dict())
    prepare_encoder(prepared, KernelConfig(), torch.device("cpu"))
    convs = [m.weight for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not plain.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = (config.model.grid_size,) * 2
    assert_close(prepared(x, grid), plain(x, grid), rtol=1e-5)
    reference = build_encoder(config.align.encoder, random_init=True)
    prepare_encoder(reference, dataclasses.replace(KernelConfig(), encoder_channels_last=False), torch.device("cpu"))
    assert not reference.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
