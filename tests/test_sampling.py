"""Euler / Heun sampling with classifier-free guidance on an interval (SPEC 7)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pixelrepa.config import SamplerConfig, get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import GuidedVelocity, guidance_scale, sample

NULL = 10


class Recorder:
    """A fake denoiser net(z, t, y) that logs every call."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, z, t, y):
        assert z.shape[0] == t.shape[0] == y.shape[0]
        self.calls.append((t.clone(), y.clone()))
        return self.fn(z, t, y)

    def evaluations(self, n: int):
        """Per network call: (t, has_cond, has_null), with t the common value of the call."""
        out = []
        for t, y in self.calls:
            assert torch.all(t == t[0])
            out.append((t[0].item(), bool((y != NULL).any()), bool((y == NULL).any())))
        return out


def cond_one_uncond_zero(z, t, y):
    """x_pred = 1 for conditional rows, 0 for null rows."""
    return (y != NULL).to(z.dtype).view(-1, *([1] * (z.dim() - 1))).expand_as(z).clone()


def measured_scale(t: float, sampler: SamplerConfig, t_eps: float = 0.05) -> float:
    """With z = 0: v_c = 1 / max(1-t, eps), v_u = 0, so the guided v times max(1-t, eps) is s."""
    gv = GuidedVelocity(cond_one_uncond_zero, torch.tensor([1, 2]), NULL, sampler, t_eps)
    v = gv(torch.zeros(2, 1, 2, 2), t)
    s = v * max(1 - torch.tensor(t, dtype=torch.float32).item(), t_eps)
    assert torch.allclose(s, s.flatten()[0])
    return s.flatten()[0].item()


# ---------------------------------------------------------------------------
# The guidance interval
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lo,hi,t,inside", [
    (0.1, 1.0, 0.0, False),
    (0.1, 1.0, 0.1, False),    # t == min is not guided
    (0.1, 1.0, 0.1001, True),
    (0.1, 1.0, 0.5, True),
    (0.1, 1.0, 0.98, True),
    (0.25, 0.75, 0.75, False),  # t == max is not guided
    (0.25, 0.75, 0.7499, True),
    (0.25, 0.75, 0.8, False),
    (0.0, 0.75, 0.0, True),     # min == 0: t = 0 is guided
    (0.0, 0.75, 0.3, True),
    (0.0, 0.75, 0.75, False),
    (0.0, 1.0, 1.0, False),
])
def test_guidance_scale_interval(lo, hi, t, inside):
    sampler = SamplerConfig(cfg_scale=2.5, interval_min=lo, interval_max=hi)
    expected = 2.5 if inside else 1.0
    assert guidance_scale(t, sampler) == expected
    assert measured_scale(t, sampler) == pytest.approx(expected, rel=1e-6)


def test_guided_velocity_formula():
    z = torch.randn(3, 3, 4, 4)
    x_c, x_u = torch.randn_like(z), torch.randn_like(z)

    def net(zz, t, y):
        is_null = (y == NULL).view(-1, 1, 1, 1)
        n = zz.shape[0]
        c = x_c if n == 3 else torch.cat([x_c, x_c])
        u = x_u if n == 3 else torch.cat([x_u, x_u])
        return torch.where(is_null, u, c)

    t, s = 0.4, 2.8
    for batched in (True, False):
        sampler = SamplerConfig(cfg_scale=s, interval_min=0.1, interval_max=1.0, batched_guidance=batched)
        v = GuidedVelocity(net, torch.tensor([0, 4, 9]), NULL, sampler, 0.05)(z, t)
        v_c, v_u = (x_c - z) / (1 - t), (x_u - z) / (1 - t)
        torch.testing.assert_close(v, v_u + s * (v_c - v_u))


class ReusedOutputBuffer:
    """A network that writes every output into one buffer, as a CUDA-graph capture does."""

    def __init__(self, fn):
        self.fn, self.buffer = fn, None

    def __call__(self, z, t, y):
        out = self.fn(z, t, y)
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = torch.empty_like(out)
        return self.buffer.copy_(out)


@pytest.mark.parametrize("batched", [True, False])
def test_guidance_survives_a_network_that_reuses_its_output_buffer(batched):
    z = torch.randn(3, 1, 2, 2)
    sampler = SamplerConfig(cfg_scale=2.5, interval_min=0.1, interval_max=1.0, batched_guidance=batched)
    labels = torch.tensor([0, 4, 9])
    fresh = GuidedVelocity(cond_one_uncond_zero, labels, NULL, sampler, 0.05)(z, 0.5)
    reused = GuidedVelocity(ReusedOutputBuffer(cond_one_uncond_zero), labels, NULL, sampler, 0.05)(z, 0.5)
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


def run_recorded(sampler: SamplerConfig, n: int = 2):
    rec = Recorder(cond_one_uncond_zero)
    sample(rec, torch.randn(n, 1, 2, 2), torch.arange(n), NULL, sampler)
    return rec.evaluations(n), rec


@pytest.mark.parametrize("batched", [True, False])
def test_no_unconditional_calls_outside_interval(batched):
    sampler = SamplerConfig(method="heun", steps=4, cfg_scale=2.0, interval_min=0.25, interval_max=0.75,
                            batched_guidance=batched)
    evals, rec = run_recorded(sampler)
    guided_t = sorted({t for t, _, has_null in evals if has_null})
    assert guided_t == [0.5]  # 0.25 == min and 0.75 == max are both outside
    if batched:
        assert all(has_cond for _, has_cond, _ in evals)
        # One forward with cond then null rows.
        (t, y), = [(t, y) for t, y in rec.calls if (y == NULL).any()][:1]
        assert y.shape[0] == 4 and torch.equal(y, torch.tensor([0, 1, NULL, NULL]))
        assert len(rec.calls) == 7
    else:
        assert len(rec.calls) == 7 + 2  # the two guided evaluations at t = 0.5 make two calls each
        assert all(y.shape[0] == 2 for _, y in rec.calls)
        # Each call is all-conditional or all-null; a null call follows the conditional one at the same t.
        for i, (t, has_cond, has_null) in enumerate(evals):
            assert has_cond != has_null
            if has_null:
                assert evals[i - 1] == (t, True, False)


def test_interval_min_zero_guides_t_zero():
    sampler = SamplerConfig(method="euler", steps=4, cfg_scale=2.0, interval_min=0.0, interval_max=0.75)
    evals, _ = run_recorded(sampler)
    assert [(t, has_null) for t, _, has_null in evals] == [(0.0, True), (0.25, True), (0.5, True), (0.75, False)]
    sampler = dataclasses.replace(sampler, interval_min=0.25, interval_max=1.0)
    evals, _ = run_recorded(sampler)
    assert [(t, has_null) for t, _, has_null in evals] == [(0.0, False), (0.25, False), (0.5, True), (0.75, True)]


def test_released_interval_on_default_grid():
    sampler = SamplerConfig(method="euler", steps=50, cfg_scale=3.1)  # interval (0.1, 1.0)
    evals, _ = run_recorded(sampler)
    grid = torch.linspace(0, 1, 51).tolist()[:-1]
    lo = torch.tensor(0.1, dtype=torch.float32).item()
    assert [t for t, _, _ in evals] == grid
    for t, _, has_null in evals:
        assert has_null == (lo < t < 1.0)
    assert sum(h for _, _, h in evals) == 44  # t = 0.12 ... 0.98


def test_cfg_one_never_calls_unconditional():
    sampler = SamplerConfig(method="heun", steps=5, cfg_scale=1.0, interval_min=0.0, interval_max=1.0)
    evals, rec = run_recorded(sampler)
    assert not any(has_null for _, _, has_null in evals)
    assert all(y.shape[0] == 2 for _, y in rec.calls)


# ---------------------------------------------------------------------------
# Step structure
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 5, 50])
def test_heun_evaluations_and_final_euler_step(steps):
    sampler = SamplerConfig(method="heun", steps=steps, cfg_scale=1.0)
    evals, _ = run_recorded(sampler)
    grid = torch.linspace(0, 1, steps + 1).tolist()
    expected = [grid[0]]
    for k in range(1, steps):
        expected += [grid[k], grid[k]]  # end of Heun step k-1, start of step k
    assert len(evals) == 2 * (steps - 1) + 1
    assert [t for t, _, _ in evals] == expected
    assert all(t < 1.0 for t, _, _ in evals)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_euler_evaluations(steps):
    evals, _ = run_recorded(SamplerConfig(method="euler", steps=steps, cfg_scale=1.0))
    assert [t for t, _, _ in evals] == torch.linspace(0, 1, steps + 1).tolist()[:-1]


def test_trajectory_and_noise_used_as_given():
    sampler = SamplerConfig(method="euler", steps=4, cfg_scale=1.0)
    noise = torch.randn(2, 1, 2, 2) * 3.0
    target = torch.full_like(noise, 0.5)
    z, traj = sample(lambda z, t, y: target.clone(), noise, torch.arange(2), NULL, sampler,
                     return_trajectory=True)
    assert len(traj) == 5 and torch.equal(traj[0], noise)
    # A denoiser that always predicts x gives the straight path z_t = t x + (1 - t) z_0.
    for k, zk in enumerate(traj):
        tk = k / 4
        torch.testing.assert_close(zk, tk * target + (1 - tk) * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, target, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Batched guidance on a real JiT
# ---------------------------------------------------------------------------

def test_batched_guidance_equals_separate_calls():
    cfg = get_preset("JiT-Micro/8")
    torch.manual_seed(0)
    net = JiT(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    noise = torch.randn(3, 3, cfg.model.input_size, cfg.model.input_size, generator=g)
    labels = torch.tensor([0, 5, 9])
    null = cfg.model.num_classes
    base = SamplerConfig(method="heun", steps=5, cfg_scale=3.0, interval_min=0.1, interval_max=1.0)
    # One guided velocity evaluation: the same maths, only the matmul blocking of a 2N batch differs.
    for t in (0.3, 0.8):
        v_a = GuidedVelocity(net, labels, null, dataclasses.replace(base, batched_guidance=True), 0.05)(noise, t)
        v_b = GuidedVelocity(net, labels, null, dataclasses.replace(base, batched_guidance=False), 0.05)(noise, t)
        assert ((v_a - v_b).norm() / v_b.norm()).item() <= 1e-6
        assert (v_a - v_b).abs().max() <= 1e-6 * v_b.abs().max()
    # The whole trajectory (9 evaluations, float32 rounding amplified by cfg = 3).
    a = sample(net, noise, labels, null, dataclasses.replace(base, batched_guidance=True))
    b = sample(net, noise, labels, null, dataclasses.replace(base, batched_guidance=False))
    assert a.abs().max() > 0.1  # the net does something
    rel = ((a - b).double().norm() / b.double().norm()).item()
    assert rel <= 5e-6, rel
    assert (a - b).abs().max() <= 1e-5
    # And guidance changes the result.
    c = sample(net, noise, labels, null, dataclasses.replace(base, cfg_scale=1.0))
    assert (a - c).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# Solver order on an ODE with a known solution
# ---------------------------------------------------------------------------

SIGMA = 2.5


def gaussian_denoiser(z, t, y):
    """E[x | z] for x ~ N(0, SIGMA^2), z = t x + (1 - t) e: linear in z."""
    t = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
    return t * SIGMA**2 * z / (t**2 * SIGMA**2 + (1 - t) ** 2)


def solver_error(method: str, steps: int) -> float:
    """The exact flow maps z_0 to z_1 = SIGMA * z_0."""
    noise = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1, 1, 1)
    sampler = SamplerConfig(method=method, steps=steps, cfg_scale=1.0)
    z = sample(gaussian_denoiser, noise, torch.zeros(9, dtype=torch.long), NULL, sampler, t_eps=1e-4)
    return (z - SIGMA * noise).abs().max().item()


def test_solver_order_on_linear_denoiser():
    e10, e20 = solver_error("euler", 10), solver_error("euler", 20)
    h10, h20 = solver_error("heun", 10), solver_error("heun", 20)
    assert h10 < 0.1 * e10 and h20 < 0.1 * e20
    # Euler: first order (error halves); Heun with one final Euler step: about second order.
    assert 1.6 < e10 / e20 < 2.5
    assert h10 / h20 > 3.0
    assert solver_error("heun", 50) < 1e-3 * SIGMA
