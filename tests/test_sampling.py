"""Sampling with classifier-free guidance on an interval (SPEC 7): Euler / Heun as released, the multistep
solvers, the time grids, autoguidance."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pixelrepa.config import SamplerConfig, get_preset
from pixelrepa.models.jit import JiT
from pixelrepa.sampling import GuidedVelocity, check_guide, guidance_scale, sample, time_grid
from pixelrepa.sampling.solvers import log_snr, multistep_update

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


MEAN, STD = 0.7, 2.5


def shifted_gaussian_denoiser(z, t, y):
    """E[x | z] for x ~ N(MEAN, STD^2), z = t x + (1 - t) e."""
    t = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
    return MEAN + t * STD**2 * (z - t * MEAN) / (t**2 * STD**2 + (1 - t) ** 2)


def exact_flow(xi: torch.Tensor, t: float) -> torch.Tensor:
    """The probability-flow solution from z_0 = xi: z_t = t MEAN + sqrt(t^2 STD^2 + (1 - t)^2) xi (the
    flow between Gaussians is the affine map that keeps the standardised value)."""
    return t * MEAN + math.sqrt(t * t * STD**2 + (1 - t) ** 2) * xi


def full_path_error(method: str, steps: int, multistep_in: str = "t") -> float:
    noise = torch.linspace(-2, 2, 9, dtype=torch.float64).view(9, 1, 1, 1)
    sampler = SamplerConfig(method=method, steps=steps, cfg_scale=1.0, multistep_in=multistep_in)
    z = sample(shifted_gaussian_denoiser, noise, torch.zeros(9, dtype=torch.long), NULL, sampler, t_eps=1e-6)
    return (z - exact_flow(noise, 1.0)).abs().max().item()


def fitted_order(errors: list[float], steps: list[float]) -> float:
    """-slope of log error against log steps."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize("method,multistep_in,low,high", [
    ("euler", "t", 0.9, 1.1),
    ("heun", "t", 1.9, 2.15),
    ("dpm2m", "t", 1.8, 2.1),
    # The third-order update (test below) is capped at 2 over the whole path by its lower-order first
    # steps and its final step onto t = 1.
    ("dpm3m", "t", 1.9, 2.15),
    # Second order up to a log factor: on the uniform grid in t the log-SNR steps next to t = 0 and
    # t = 1 do not shrink (lambda_k ~ log k), which costs O(log N / N^2); 1.75 measured on 16..256.
    ("dpm2m", "log_snr", 1.65, 2.1),
    ("dpm3m", "log_snr", 1.9, 2.15),
])
def test_global_order_on_gaussian_data(method, multistep_in, low, high):
    steps = [16, 32, 64, 128, 256]
    errors = [full_path_error(method, n, multistep_in) for n in steps]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert low < fitted_order(errors, steps) < high


def test_dpm2m_beats_euler_and_heun_per_evaluation():
    """At 32 network evaluations per image: Euler 32 steps, Heun 16 (31 evaluations), dpm2m 32; in t
    the released grid's ends cost dpm2m less than in the log-SNR."""
    euler, heun = full_path_error("euler", 32), full_path_error("heun", 16)
    dpm2m, dpm2m_log_snr = full_path_error("dpm2m", 32), full_path_error("dpm2m", 32, "log_snr")
    assert dpm2m < heun / 3 and dpm2m < euler / 30 and dpm2m < dpm2m_log_snr / 5


@pytest.mark.parametrize("variable", ["t", "log_snr"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_update_local_order(order, variable):
    """One step from the exact state with an exact history at log-SNR spacing h: error O(h^(order + 1))."""
    xi = torch.linspace(-2, 2, 9, dtype=torch.float64)

    def t_of(lam):
        return 1 / (1 + math.exp(-lam))

    def predicted(t):
        return shifted_gaussian_denoiser(exact_flow(xi, t), torch.tensor([t]), None)

    errors, widths = [], [0.2, 0.1, 0.05, 0.025]
    for h in widths:
        history = [(t_of(lam), predicted(t_of(lam))) for lam in (-k * h for k in reversed(range(order)))]
        z = multistep_update(exact_flow(xi, 0.5), 0.5, t_of(h), history, variable)
        errors.append((z - exact_flow(xi, t_of(h))).abs().max().item())
    assert order + 0.9 < -fitted_order(errors, widths) < order + 1.1


@pytest.mark.parametrize("variable", ["t", "log_snr"])
def test_first_order_multistep_is_the_unclamped_euler_step(variable):
    z, x_hat = torch.randn(4), torch.randn(4)
    for t, t_next in ((0.0, 0.25), (0.3, 0.5), (0.9, 0.97)):
        torch.testing.assert_close(multistep_update(z, t, t_next, [(t, x_hat)], variable),
                                   z + (t_next - t) * (x_hat - z) / (1 - t))


# ---------------------------------------------------------------------------
# Euler / Heun stay the released sampler, bit for bit
# ---------------------------------------------------------------------------

def released_loop(net, noise, labels, sampler, t_eps=0.05):
    """The sampler as it was before the grids and the multistep solvers: linspace grid, Heun except
    the last step."""
    v = GuidedVelocity(net, labels, NULL, sampler, t_eps)
    grid = torch.linspace(0, 1, sampler.steps + 1, dtype=torch.float32).tolist()
    z = noise
    for k in range(sampler.steps):
        t, t_next = grid[k], grid[k + 1]
        dt = t_next - t
        v0 = v(z, t)
        if sampler.method == "heun" and k < sampler.steps - 1:
            z = z + dt * (0.5 * (v0 + v(z + dt * v0, t_next)))
        else:
            z = z + dt * v0
    return z


@pytest.mark.parametrize("method", ["heun", "euler"])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_euler_and_heun_unchanged_bit_for_bit(method, steps):
    g = torch.Generator().manual_seed(steps)
    weights = torch.randn(3, 3, generator=g)

    def net(z, t, y):
        return torch.tanh(torch.einsum("ij,njhw->nihw", weights, z)) * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)

    noise = torch.randn(4, 3, 2, 2, generator=g)
    labels = torch.tensor([0, 3, 5, 9])
    for batched in (True, False):
        sampler = SamplerConfig(method=method, steps=steps, cfg_scale=2.5, batched_guidance=batched)
        assert torch.equal(sample(net, noise, labels, NULL, sampler), released_loop(net, noise, labels, sampler))


# ---------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 10, 50, 99])
def test_uniform_grid_is_the_released_linspace(steps):
    grid = time_grid(SamplerConfig(steps=steps))
    assert grid == torch.linspace(0, 1, steps + 1, dtype=torch.float32).tolist()
    evals, _ = run_recorded(SamplerConfig(method="euler", steps=steps, cfg_scale=1.0))
    assert [t for t, _, _ in evals] == grid[:-1]


def test_shifted_grid_direction_and_log_snr():
    uniform = time_grid(SamplerConfig(steps=10))
    towards_noise = time_grid(SamplerConfig(steps=10, schedule="shifted", shift=3.0))
    towards_data = time_grid(SamplerConfig(steps=10, schedule="shifted", shift=1 / 3))
    assert towards_noise[0] == 0.0 and towards_noise[-1] == 1.0
    assert all(a < u < b for a, u, b in zip(towards_noise[1:-1], uniform[1:-1], towards_data[1:-1]))
    # shift > 1: the first step is shorter than uniform's, the last longer (denser near t = 0).
    assert towards_noise[1] < uniform[1] and 1 - towards_noise[-2] > 1 - uniform[-2]
    for t, u in zip(towards_noise[1:-1], uniform[1:-1]):
        assert log_snr(t) == pytest.approx(log_snr(u) - math.log(3.0), abs=1e-6)
    assert time_grid(SamplerConfig(steps=10, schedule="shifted", shift=1.0)) == pytest.approx(uniform, abs=1e-7)


def test_edm_grid():
    sampler = SamplerConfig(steps=8, schedule="edm", rho=7.0, sigma_min=0.002, sigma_max=80.0)
    grid = time_grid(sampler)
    assert len(grid) == 9 and grid[0] == 0.0 and grid[-1] == 1.0
    assert all(a < b for a, b in zip(grid, grid[1:]))
    sigma = [(1 - t) / t for t in grid[1:-1]]
    assert sigma[-1] == pytest.approx(0.002, rel=1e-4)
    roots = [s ** (1 / 7) for s in [80.0] + sigma]  # uniform in sigma^(1 / rho) from sigma_max
    assert np.diff(roots) == pytest.approx(np.full(7, roots[1] - roots[0]), rel=1e-4)
    assert time_grid(dataclasses.replace(sampler, steps=1)) == [0.0, 1.0]
    with pytest.raises(ValueError, match="repeated times"):
        time_grid(SamplerConfig(steps=500, schedule="shifted", shift=1e-6))


@pytest.mark.parametrize("schedule", ["uniform", "shifted", "edm"])
@pytest.mark.parametrize("method", ["euler", "heun", "dpm2m", "dpm3m"])
def test_evaluations_follow_the_grid_and_never_reach_t_one(method, schedule):
    sampler = SamplerConfig(method=method, steps=6, schedule=schedule, cfg_scale=2.0)
    evals, _ = run_recorded(sampler)
    grid = time_grid(sampler)
    expected = grid[:-1] if method != "heun" else [grid[0]] + [t for t in grid[1:-1] for _ in range(2)]
    assert [t for t, _, _ in evals] == expected
    assert all(has_null == (guidance_scale(t, sampler) != 1.0) for t, _, has_null in evals)


def test_multistep_restarts_at_the_guidance_interval():
    """x^ jumps where guidance starts; the step there is first order (no extrapolation across it)."""
    sampler = SamplerConfig(method="dpm2m", steps=10, cfg_scale=3.0, interval_min=0.45, interval_max=1.0)
    rec = Recorder(cond_one_uncond_zero)
    noise = torch.zeros(2, 1, 2, 2)
    _, trajectory = sample(rec, noise, torch.arange(2), NULL, sampler, return_trajectory=True)
    # Guided x^ = 3 from t = 0.5 on, 1 before: first order from 0.5 to 0.6 moves z to 3 * 0.6 exactly
    # when z(0.5) = 0.5 (x^ = 1 held before), while extrapolating across the jump would overshoot.
    torch.testing.assert_close(trajectory[5], torch.full_like(noise, 0.5))
    expected = trajectory[5] + (0.6 - 0.5) / 0.5 * (3.0 - trajectory[5])
    torch.testing.assert_close(trajectory[6], expected)


# ---------------------------------------------------------------------------
# Autoguidance
# ---------------------------------------------------------------------------

def test_autoguidance_equals_the_direct_computation():
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 4, 9])
    main_x, weak_x = torch.randn_like(z), torch.randn_like(z)
    seen = []

    def main(zz, t, y):
        seen.append(("main", y.clone()))
        return main_x + 0 * zz

    def weak(zz, t, y):
        seen.append(("weak", y.clone()))
        return weak_x + 0 * zz

    w, t = 2.2, 0.4
    sampler = SamplerConfig(cfg_scale=w, interval_min=0.1, interval_max=1.0)
    guided = GuidedVelocity(main, labels, NULL, sampler, 0.05, guide=weak)
    torch.testing.assert_close(guided.denoised(z, t), weak_x + w * (main_x - weak_x))
    v_weak, v_main = ((x - z) / (1 - t) for x in (weak_x, main_x))
    torch.testing.assert_close(guided(z, t), v_weak + w * (v_main - v_weak))
    assert [name for name, _ in seen] == ["main", "weak"] * 2
    assert all(torch.equal(y, labels) for _, y in seen)  # both conditional: no null label
    seen.clear()
    torch.testing.assert_close(guided.denoised(z, 0.05), main_x)  # outside the interval: the main model only
    assert [name for name, _ in seen] == ["main"]


@pytest.mark.parametrize("method", ["euler", "heun", "dpm2m"])
def test_autoguided_sampling_equals_a_guided_denoiser(method):
    """Sampling with a guide = sampling the single denoiser D_w + s (D_m - D_w) inside the interval."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))

    def main(z, t, y):
        return torch.tanh(torch.einsum("ij,njhw->nihw", a, z))

    def weak(z, t, y):
        return torch.tanh(torch.einsum("ij,njhw->nihw", b, z))

    # The multistep solvers restart where the scale changes, which the single denoiser cannot show.
    interval = (0.0, 1.0) if method == "dpm2m" else (0.3, 0.9)
    sampler = SamplerConfig(method=method, steps=6, cfg_scale=2.0, interval_min=interval[0], interval_max=interval[1])

    def combined(z, t, y):
        s = torch.tensor([guidance_scale(ti, sampler) for ti in t.tolist()]).view(-1, 1, 1, 1)
        return weak(z, t, y) + s * (main(z, t, y) - weak(z, t, y))

    noise = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    guided = sample(main, noise, labels, NULL, sampler, guide=weak)
    direct = sample(combined, noise, labels, NULL, dataclasses.replace(sampler, cfg_scale=1.0))
    torch.testing.assert_close(guided, direct)


@pytest.mark.parametrize("change,named", [
    ({"model.input_size": 64}, "image size 32 vs the guide's 64"),
    ({"model.patch_size": 8}, "patch grid 8x8 vs the guide's 4x4"),
    ({"model.num_classes": 100}, "classes 10 vs the guide's 100"),
    ({"objective.noise_scale": 2.0}, "noise scale 1.0 vs the guide's 2.0"),
])
def test_check_guide_refuses_a_guide_that_does_not_fit(change, named):
    config = get_preset("PixelREPA-Tiny/4")
    guide = config.replace(**change)
    with pytest.raises(ValueError, match=named):
        check_guide(config, guide)


def test_check_guide_accepts_a_smaller_model_of_the_same_data():
    config = get_preset("PixelREPA-Tiny/4")
    check_guide(config, config.replace(**{"model.depth": 2, "model.hidden_size": 64}))
    check_guide(config, get_preset("JiT-Tiny/4"))
