"""Class-conditional sampling with a JiT, as `pixelrepa sample` does it (written by `pixelrepa export
--diffusers`; needs torch and diffusers only).

    pipe = DiffusionPipeline.from_pretrained(FOLDER, trust_remote_code=True)
    images = pipe(class_labels=[1, 7], num_inference_steps=16, guidance_scale=3.0, guidance_interval=(0.1, 1.0),
                  method="dpm2m", schedule="shifted", generator=torch.manual_seed(0)).images

The call follows diffusers' DiTPipeline; `guidance_interval`, `method` (heun | euler | dpm2m | dpm3m) and
`schedule` (uniform | shifted | edm) are the extra keywords, and every keyword left out takes the
exported run's sampler setting (shift, rho, sigma_min, sigma_max and multistep_in are scheduler
config: `JiTFlowScheduler.from_config(pipe.scheduler.config, shift=...)`). The network predicts the
clean image x; guidance combines the conditional and unconditional passes as D_u + s (D_c - D_u), of
the velocity D = (x - z) / max(1 - t, t_eps) for Heun / Euler and of x itself for the multistep
solvers (the scheduler's `model_output_type`), where guidance applies (interval_min < t <
interval_max, no lower bound when interval_min is 0; elsewhere s = 1 and only the conditional pass
runs). The initial noise is a standard normal draw (or `latents`) times the scheduler's
`noise_scale`; `generator` may be a list, one per image.
"""

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


class JiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler, id2label=None, guidance_scale=1.0, guidance_interval=(0.0, 1.0),
                 num_inference_steps=50):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(id2label=id2label, guidance_scale=guidance_scale,
                                guidance_interval=list(guidance_interval), num_inference_steps=num_inference_steps)
        self.labels = {name.strip(): int(key) for key, names in (id2label or {}).items() for name in names.split(",")}

    def get_label_ids(self, label):
        """Class ids of class names (`id2label`)."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name '{unknown[0]}'; known: {', '.join(sorted(self.labels))}")
        return [self.labels[name] for name in names]

    @staticmethod
    def _as_float32(value):
        return torch.tensor(value, dtype=torch.float32).item()

    def guidance_at(self, t, scale, interval):
        """`scale` inside the interval, 1 outside (compared in float32)."""
        t, lo, hi = (self._as_float32(v) for v in (t, *interval))
        return scale if t < hi and (lo == 0 or t > lo) else 1.0

    def guided(self, z, t, labels, scale):
        """The scheduler's model output at t, guided with `scale` (1: the conditional pass only)."""
        n = z.shape[0]
        t_vec = torch.full((n,), t, dtype=torch.float32, device=z.device)
        velocity = self.scheduler.model_output_type == "velocity"
        denominator = (1 - t_vec.view(-1, 1, 1, 1)).clamp_min(self.scheduler.config.t_eps)

        def output(x):
            return (x - z) / denominator if velocity else x

        dtype = self.transformer.dtype
        if scale == 1.0:
            return output(self.transformer(z.to(dtype), t_vec, labels).sample.float())
        null = torch.full_like(labels, self.transformer.config.num_classes)
        x = self.transformer(torch.cat([z, z]).to(dtype), torch.cat([t_vec, t_vec]), torch.cat([labels, null]))
        x_cond, x_uncond = x.sample.float().chunk(2)
        cond, uncond = output(x_cond), output(x_uncond)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale=None, generator=None, num_inference_steps=None,
                 output_type="pil", return_dict=True, guidance_interval=None, method=None, schedule=None,
                 latents=None):
        cfg = self.config
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        interval = tuple(cfg.guidance_interval if guidance_interval is None else guidance_interval)
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        device = self._execution_device
        self.scheduler.set_timesteps(steps, device=device, method=method, schedule=schedule)
        model = self.transformer.config
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= model.num_classes:
            raise ValueError(f"class_labels must be class ids in 0..{model.num_classes - 1} (id {model.num_classes} "
                             f"is the unconditional label), got {class_labels}; names: get_label_ids()")
        shape = (len(labels), model.in_channels, model.sample_size, model.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        z = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            t = t.item()
            s = self.guidance_at(t, scale, interval)
            z = self.scheduler.step(self.guided(z, t, labels, s), t, z, guidance_scale=s).prev_sample
        if output_type == "pil":
            pixels = ((z + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        elif output_type in ("np", "pt"):
            images = (z / 2 + 0.5).clamp(0, 1)
            images = images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images
        else:
            raise ValueError(f"unknown output_type '{output_type}' (pil | np | pt)")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
