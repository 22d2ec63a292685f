"""Euler / Heun steps of a flow from noise (t = 0) to image (t = 1), as `pixelrepa sample` takes them
(written by `pixelrepa export --diffusers`; needs torch and diffusers only).

The time grid is linspace(0, 1, steps + 1). Heun: a predictor and a corrector evaluation per step,
except the last step, a single Euler step onto t = 1 (the network is never evaluated at t = 1);
Euler: one evaluation per step. `timesteps` lists every evaluation time in order, and `step` takes
the velocity at the next one of them.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class JiTFlowSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class JiTFlowScheduler(SchedulerMixin, ConfigMixin):
    order = 1

    @register_to_config
    def __init__(self, method="heun", t_eps=0.05, noise_scale=1.0):
        if method not in ("heun", "euler"):
            raise ValueError(f"unknown method '{method}' (heun | euler)")
        self.init_noise_sigma = noise_scale
        self.timesteps = None

    def set_timesteps(self, num_inference_steps, device=None, method=None):
        method = method or self.config.method
        if method not in ("heun", "euler"):
            raise ValueError(f"unknown method '{method}' (heun | euler)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.grid = torch.linspace(0, 1, num_inference_steps + 1, dtype=torch.float32).tolist()
        self.plan = []  # (stage, step k) of every evaluation
        for k in range(num_inference_steps):
            heun = method == "heun" and k < num_inference_steps - 1
            self.plan += [("predict", k), ("correct", k)] if heun else [("euler", k)]
        times = [self.grid[k + 1] if stage == "correct" else self.grid[k] for stage, k in self.plan]
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self.evaluation = 0
        self.saved = None

    def scale_model_input(self, sample, timestep=None):
        return sample

    def step(self, model_output, timestep, sample, return_dict=True):
        """The sample after the velocity `model_output` at `timestep`, the next entry of `timesteps`."""
        stage, k = self.plan[self.evaluation]
        self.evaluation += 1
        dt = self.grid[k + 1] - self.grid[k]
        if stage == "predict":  # z + dt v0: where the corrector evaluates
            self.saved = (sample, model_output)
            prev = sample + dt * model_output
        elif stage == "correct":  # z + dt (v0 + v1) / 2
            start, v0 = self.saved
            self.saved = None
            prev = start + dt * (0.5 * (v0 + model_output))
        else:
            prev = sample + dt * model_output
        return JiTFlowSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return len(self.plan) if self.timesteps is not None else 0
