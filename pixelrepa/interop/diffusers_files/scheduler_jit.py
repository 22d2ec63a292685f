"""Steps of a flow from noise (t = 0) to image (t = 1), as `pixelrepa sample` takes them (written by
`pixelrepa export --diffusers`; needs torch and diffusers only, so pixelrepa's math is restated here).

Time grids (`schedule`, as `pixelrepa.sampling.schedules.time_grid`, the same float32 times):
`uniform` is linspace(0, 1, steps + 1) in float32, as released; `shifted` maps it through
t -> t / (t + shift (1 - t)); `edm` places EDM's rho-spaced sigma = (1 - t) / t from sigma_max to
sigma_min, then t = 1, and starts at t = 0.

Methods (`method`, as `pixelrepa.sampling.solvers`): `heun` takes a predictor and a corrector
evaluation per step, except the last step, a single Euler step onto t = 1 (the network is never
evaluated at t = 1); `euler` one evaluation per step; both step with the guided velocity. `dpm2m` /
`dpm3m` are the multistep data-prediction solvers (DPM-Solver++(2M) and its third order), one
evaluation per step, stepping with the guided x-prediction (`model_output_type`), extrapolated in t or
the log-SNR (`multistep_in`). `timesteps` lists every evaluation time in order, and `step` takes the
model output at the next one of them.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

MULTISTEP_ORDER = {"dpm2m": 2, "dpm3m": 3}
METHODS = ("heun", "euler", *MULTISTEP_ORDER)
SCHEDULES = ("uniform", "shifted", "edm")


@dataclass
class JiTFlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


def check_choice(kind, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {kind} '{value}' ({' | '.join(choices)})")


def time_grid(schedule, steps, shift, rho, sigma_min, sigma_max):
    """`pixelrepa.sampling.schedules.time_grid`: steps + 1 increasing float32 times from 0 to 1."""
    if schedule == "uniform":
        return torch.linspace(0, 1, steps + 1, dtype=torch.float32).tolist()
    if schedule == "shifted":
        t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        t = t / (t + shift * (1 - t))
    elif steps == 1:
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    else:
        k = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        sigma = (sigma_max ** (1 / rho) + k * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        t = torch.cat([1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])
        t[0] = 0.0
    grid = t.to(torch.float32).tolist()
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"the '{schedule}' grid of {steps} steps has repeated times in float32: "
                         "use fewer steps or a milder shift / sigma range")
    return grid


def log_snr(t):
    return math.log(t / (1 - t))


def multistep_update(z, t, t_next, history, variable):
    """`pixelrepa.sampling.solvers.multistep_update`, whose docstring derives it: from t to t_next < 1,
    the linear part integrated exactly, x^ extrapolated in Newton form through `history` [(t_j, x^_j)]
    (newest last, at t) in t or the log-SNR (leaving out t = 0 there)."""
    x0 = history[-1][1]
    z_next = z + (t_next - t) / (1 - t) * (x0 - z)
    points = history if variable == "t" else [(log_snr(tj), xj) for tj, xj in history if tj > 0]
    if len(points) < 2:
        return z_next
    (s0, _), (s1, x1) = points[-1], points[-2]
    d1 = (x0 - x1) / (s0 - s1)
    sigma, sigma_next, sigma1 = 1 - t, 1 - t_next, 1 - history[-2][0]
    if variable == "t":
        log_ratio = math.log(sigma / sigma_next)
        w1 = sigma - sigma_next - sigma_next * log_ratio
        w2 = sigma * sigma1 * (1 - sigma_next / sigma) - sigma_next * (sigma + sigma1) * log_ratio \
            + sigma_next * (sigma - sigma_next)
    else:
        h, h1 = log_snr(t_next) - s0, s0 - s1
        i1, i2 = h + math.expm1(-h), h * h - 2 * h - 2 * math.expm1(-h)
        w1, w2 = t_next * i1, t_next * (i2 + h1 * i1)
    if len(points) == 2:
        return z_next + w1 * d1
    s2, x2 = points[-3]
    d2 = (d1 - (x1 - x2) / (s1 - s2)) / (s0 - s2)
    return z_next + w1 * d1 + w2 * d2


class JiTFlowScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, method="heun", t_eps=0.05, noise_scale=1.0, multistep_in="t", schedule="uniform",
                 shift=3.0, rho=7.0, sigma_min=0.002, sigma_max=80.0):
        check_choice("method", method, METHODS)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("multistep_in", multistep_in, ("t", "log_snr"))
        if not (shift > 0 and rho > 0 and 0 < sigma_min < sigma_max):
            raise ValueError(f"need shift > 0, rho > 0 and 0 < sigma_min < sigma_max; got shift {shift}, rho {rho}, "
                             f"sigma_min {sigma_min}, sigma_max {sigma_max}")
        self.init_noise_sigma = noise_scale
        self.timesteps = None

    def set_timesteps(self, num_inference_steps, device=None, method=None, schedule=None):
        """The evaluation times of `num_inference_steps` steps of `method` on `schedule` (default: config)."""
        method, schedule = method or self.config.method, schedule or self.config.schedule
        check_choice("method", method, METHODS)
        check_choice("schedule", schedule, SCHEDULES)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        c = self.config
        self.grid = time_grid(schedule, num_inference_steps, c.shift, c.rho, c.sigma_min, c.sigma_max)
        self.num_inference_steps = num_inference_steps
        self.model_output_type = "sample" if method in MULTISTEP_ORDER else "velocity"
        self.plan = []  # (stage, step k) of every evaluation
        for k in range(num_inference_steps):
            heun = method == "heun" and k < num_inference_steps - 1
            self.plan += [("predict", k), ("correct", k)] if heun else [(method, k)]
        times = [self.grid[k + 1] if stage == "correct" else self.grid[k] for stage, k in self.plan]
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self.evaluation = 0
        self.saved = None
        self.history, self.history_scale = [], None

    def scale_model_input(self, sample, timestep=None):
        return sample

    def step(self, model_output, timestep, sample, return_dict=True, guidance_scale=None):
        """The sample after `model_output` at `timestep`, the next entry of `timesteps`: the velocity
        (heun, euler) or the x-prediction (dpm2m, dpm3m) guided with `guidance_scale`. The multistep
        history restarts where that scale changes (x^ jumps at the guidance interval's edges), and the
        step onto t = 1 is the released final Euler step z + (1 - t) (x^ - z) / max(1 - t, t_eps)."""
        if self.timesteps is None or self.evaluation >= len(self.plan):
            raise ValueError("step() has no evaluation left: call set_timesteps() before sampling again")
        expected = self.timesteps[self.evaluation].item()
        if float(timestep) != expected:
            raise ValueError(f"step() got the output at t = {float(timestep):.6g}, but the next evaluation is at "
                             f"t = {expected:.6g}: call step() once per entry of timesteps, in order")
        stage, k = self.plan[self.evaluation]
        self.evaluation += 1
        t, t_next = self.grid[k], self.grid[k + 1]
        if stage in MULTISTEP_ORDER:
            if guidance_scale != self.history_scale:
                self.history, self.history_scale = [], guidance_scale
            self.history = (self.history + [(t, model_output)])[-MULTISTEP_ORDER[stage]:]
            if t_next >= 1.0:
                prev = sample + (1 - t) / max(1 - t, self.config.t_eps) * (model_output - sample)
            else:
                prev = multistep_update(sample, t, t_next, self.history, self.config.multistep_in)
        elif stage == "predict":  # z + dt v0: where the corrector evaluates
            self.saved = (sample, model_output)
            prev = sample + (t_next - t) * model_output
        elif stage == "correct":  # z + dt (v0 + v1) / 2
            start, v0 = self.saved
            self.saved = None
            prev = start + (t_next - t) * (0.5 * (v0 + model_output))
        else:
            prev = sample + (t_next - t) * model_output
        return JiTFlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return len(self.plan) if self.timesteps is not None else 0
