"""The component configs: one small dataclass per component, composed into `RunConfig`.

Every recipe constant is a field whose default is the published value (SPEC sections
cited per field). `RunConfig.to_dict` / `RunConfig.from_dict` give the JSON saved with runs
and checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pixelrepa.config.overrides import apply_overrides, from_dict, moved_fields

AlignMode = Literal["none", "repa", "irepa", "pixelrepa"]
ProjectorKind = Literal["mlp", "conv"]
TargetNorm = Literal["none", "spatial_zscore"]
AttentionImpl = Literal["auto", "sdpa", "reference"]
TargetDtype = Literal["float32", "bfloat16"]
SamplerMethod = Literal["heun", "euler", "dpm2m", "dpm3m"]
SamplerSchedule = Literal["uniform", "shifted", "edm"]
CompileMode = Literal["auto", "none", "blocks", "model"]
LinearKernel = Literal["auto", "onednn", "aten"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_at_least(config: object, section: str, minimum: int, names: str, unset: str | None = None) -> None:
    """Each of the fields `names` of `config` is >= minimum; None too where `unset` says what None means."""
    for name in names.split():
        value = getattr(config, name)
        if value is None and unset is not None:
            continue
        allowed = f">= {minimum}" + (f" (or {unset})" if unset else "")
        _check(value >= minimum, f"{section}.{name} must be {allowed}, got {value}")


def _check_fraction(section: str, name: str, value: float, top_open: bool = True) -> None:
    """0 <= value < 1 (<= 1 when not `top_open`)."""
    ok = 0 <= value < 1 if top_open else 0 <= value <= 1
    _check(ok, f"{section}.{name} must be in [0, 1{')' if top_open else ']'}, got {value}")


@dataclass(frozen=True)
class JiTConfig:
    """The JiT backbone (SPEC 3)."""

    input_size: int = 256
    """Image side in pixels (square images)."""
    patch_size: int = 16
    """Side p of the square patches; the token grid is input_size / p per side."""
    in_channels: int = 3
    """Image channels (3: RGB in [-1, 1])."""
    hidden_size: int = 768
    """Token width D."""
    depth: int = 12
    """Number of JiT blocks."""
    num_heads: int = 12
    """Attention heads; the head size D / heads is a multiple of 4 for 2-D RoPE."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden size is int(int(D * mlp_ratio) * 2 / 3)."""
    attn_drop: float = 0.0
    """Attention-probability dropout, middle blocks only (0 in every released recipe, H included)."""
    proj_drop: float = 0.0
    """Projection and SwiGLU-hidden dropout, middle blocks only (0.2 for H)."""
    num_classes: int = 1000
    """Class count K; label K is the null class used for guidance."""
    bottleneck_dim: int = 128
    """Channels between the p x p patch convolution and the 1 x 1 convolution to D."""
    in_context_len: int = 32
    """Number of in-context class tokens (y_emb plus a learned position embedding)."""
    in_context_start: int = 4
    """In-context class tokens are prepended before this block."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon everywhere (also q/k norms)."""

    def __post_init__(self) -> None:
        _check_at_least(self, "model", 1, "input_size patch_size in_channels hidden_size depth num_heads num_classes "
                        "bottleneck_dim")
        _check_at_least(self, "model", 0, "in_context_len in_context_start")
        _check(self.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check_fraction("model", "attn_drop", self.attn_drop)
        _check_fraction("model", "proj_drop", self.proj_drop)
        _check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        _check(self.input_size % self.patch_size == 0,
               f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check((self.hidden_size // self.num_heads) % 4 == 0,
               f"head size {self.hidden_size // self.num_heads} must be a multiple of 4 for 2-D RoPE")
        _check(self.hidden_size % 4 == 0, "hidden_size must be a multiple of 4 (2-D sin-cos table)")
        _check(0 <= self.in_context_start <= self.depth,
               f"in_context_start {self.in_context_start} outside [0, depth={self.depth}]")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen representation encoder that produces alignment targets (SPEC 5)."""

    name: str = "vit_base_patch14_dinov2.lvd142m"
    """A timm model name, or 'efficientnet-lite0' for the offline ImageNet encoder."""
    img_size: int = 256
    """Resolution the encoder is built at and fed (released: 256, patch resampled to 16)."""
    patch_size: int = 16
    """ViT patch size after resampling (released 16; REPA-style 14 at 224)."""
    feature_dim: int = 768
    """Channel width of the target features (DINOv2-B: 768)."""
    weights: str | None = None
    """Local weights file; None means the timm hub (online) or the packaged file."""
    stage: int = -1
    """For CNN encoders: which feature stage gives the tokens (-1 = last)."""

    def __post_init__(self) -> None:
        _check_at_least(self, "align.encoder", 1, "img_size patch_size feature_dim")


@dataclass(frozen=True)
class AlignConfig:
    """Representation alignment: the switch and both heads (SPEC 5)."""

    mode: AlignMode = "pixelrepa"
    """'none' (plain JiT), 'repa' (MLP projector), 'irepa' (conv projector, spatially z-scored
    targets) or 'pixelrepa' (Masked Transformer Adapter)."""
    weight: float = 0.1
    """lambda in total = denoise + lambda * align (PixelREPA 0.1; REPA and iREPA use 0.5)."""
    tap_block: int | None = None
    """Tokens are read after this many blocks; None = in_context_start (SPEC 5)."""
    mask_ratio: float = 0.2
    """Probability that a tapped token is replaced by the mask token (PixelREPA)."""
    adapter_depth: int = 2
    """JiT blocks in the Masked Transformer Adapter."""
    adapter_in_context_len: int = 32
    """In-context class tokens of the adapter."""
    skip_head_if_same_width: bool = True
    """Released-code quirk: the adapter's projection head is skipped when the backbone
    width equals the encoder width."""
    projector_hidden: int = 2048
    """REPA's MLP projector width."""
    projector: ProjectorKind | None = None
    """Projector of repa/irepa: 'mlp' or 'conv' (a k x k convolution over the token grid);
    None = the mode's (repa: mlp, irepa: conv)."""
    projector_kernel: int = 3
    """Kernel size of the conv projector (iREPA: 3; odd, so the grid keeps its size)."""
    target_norm: TargetNorm | None = None
    """Normalisation of the encoder features before the loss: 'none' or 'spatial_zscore' (per
    image and channel over the tokens); None = the mode's (irepa: spatial_zscore, else none)."""
    zscore_alpha: float = 0.8
    """Coefficient of the token mean subtracted by the spatial z-score (iREPA's JiT code: 0.8)."""
    zscore_eps: float = 1e-6
    """Added to the token standard deviation by the spatial z-score (iREPA: 1e-6)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen encoder whose features are the alignment targets."""
    target_cache: str | None = None
    """Encoder targets computed once for the whole pack and read with the images (both flip
    orientations when data.hflip): None computes them every step (as released); 'auto' keeps
    them in <pack>/targets/<encoder>-<res>px-stage<k>-grid<g>; any other value is that folder."""
    target_cache_dtype: TargetDtype = "float32"
    """Storage dtype of cached targets: float32 holds what the encoder gave exactly; bfloat16
    halves the disk and is exact only where the encoder ran under bf16 autocast."""

    def __post_init__(self) -> None:
        _check(self.target_cache is None or self.target_cache.strip() != "",
               "align.target_cache is empty: None (off), 'auto' or a folder")
        _check(self.weight >= 0, f"align.weight {self.weight} is negative; the alignment loss is added "
               "with weight >= 0 (0.1 for PixelREPA, 0.5 for REPA)")
        _check(self.mode in ("none", "repa", "irepa", "pixelrepa"),
               f"unknown alignment mode '{self.mode}' (none | repa | irepa | pixelrepa)")
        _check(self.projector in (None, "mlp", "conv"),
               f"unknown align.projector '{self.projector}' (mlp | conv, or None for the mode's)")
        _check(self.projector is None or self.mode in ("repa", "irepa"),
               f"align.projector is set to '{self.projector}' but align.mode '{self.mode}' has no "
               "projector: use it with repa or irepa, or leave it unset")
        _check(self.target_norm in (None, "none", "spatial_zscore"),
               f"unknown align.target_norm '{self.target_norm}' (none | spatial_zscore, or None for the mode's)")
        _check(self.projector_kernel >= 1 and self.projector_kernel % 2 == 1,
               f"align.projector_kernel must be odd and >= 1 (padding k // 2 keeps the grid), "
               f"got {self.projector_kernel}")
        _check(self.zscore_eps > 0, f"align.zscore_eps must be positive, got {self.zscore_eps}")
        _check(0.0 <= self.mask_ratio < 1.0, f"align.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        _check_at_least(self, "align", 1, "adapter_depth projector_hidden")
        _check_at_least(self, "align", 0, "adapter_in_context_len")

    @property
    def resolved_projector(self) -> ProjectorKind:
        """The projector repa/irepa build: `projector`, or the mode's (irepa: conv, repa: mlp)."""
        return self.projector or ("conv" if self.mode == "irepa" else "mlp")

    @property
    def resolved_target_norm(self) -> TargetNorm:
        """The target normalisation applied: `target_norm`, or the mode's (irepa: spatial_zscore)."""
        return self.target_norm or ("spatial_zscore" if self.mode == "irepa" else "none")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The x-prediction, velocity-loss objective (SPEC 4)."""

    P_mean: float = -0.8
    """Mean of the logit-normal t: t = sigmoid(N(P_mean, P_std))."""
    P_std: float = 0.8
    """Standard deviation of the logit-normal t."""
    t_eps: float = 0.05
    """Floor of 1 - t in the velocity v = (x - z) / max(1 - t, t_eps)."""
    noise_scale: float = 1.0
    """1.0 at 256 px, 2.0 at 512 px."""
    label_drop_prob: float = 0.1
    """Probability that a training label is replaced by the null class (for guidance)."""

    def __post_init__(self) -> None:
        _check(self.P_std > 0, f"P_std must be positive, got {self.P_std}")
        _check(0 < self.t_eps <= 1, f"t_eps must be in (0, 1], got {self.t_eps}")
        _check(self.noise_scale > 0, f"noise_scale must be positive, got {self.noise_scale}")
        _check(0 <= self.label_drop_prob <= 1, f"label_drop_prob {self.label_drop_prob} outside [0, 1]")


@dataclass(frozen=True)
class EMAConfig:
    """Two moving averages of the backbone (SPEC 6)."""

    decays: tuple[float, ...] = (0.9999, 0.9996)
    """Decay of each moving average; EMA 1 (the first) is the one sampled by default."""
    warmup: bool = False
    """If set, decay_k = min(decay, (1 + step) / (10 + step)) for short runs."""

    def __post_init__(self) -> None:
        _check(len(self.decays) >= 1, "at least one EMA decay is needed")
        _check(all(0 < d < 1 for d in self.decays), f"ema.decays must each be in (0, 1), got {self.decays}")


@dataclass(frozen=True)
class SamplerConfig:
    """Solving the flow from noise (t = 0) to image (t = 1) with guidance on an interval (SPEC 7)."""

    method: SamplerMethod = "heun"
    """'heun' (Heun steps, a final Euler step onto t = 1), 'euler', or the multistep 'dpm2m' / 'dpm3m'
    (DPM-Solver++(2M) / its third-order variant in log-SNR, one evaluation per step)."""
    steps: int = 50
    """Steps of the time grid; Heun makes 2 * steps - 1 evaluations, the others steps."""
    multistep_in: Literal["t", "log_snr"] = "t"
    """The variable dpm2m / dpm3m extrapolate x^ in: 't', or 'log_snr' (DPM-Solver++ as published)."""
    schedule: SamplerSchedule = "uniform"
    """Time grid: 'uniform' (linspace(0, 1, steps + 1), as released), 'shifted' or 'edm'."""
    shift: float = 3.0
    """'shifted': t -> t / (t + shift (1 - t)); shift > 1 packs the steps towards the noise (t = 0), < 1 the data."""
    rho: float = 7.0
    """'edm': steps uniform in sigma^(1 / rho), sigma = (1 - t) / t (Karras et al. 2022: 7)."""
    sigma_min: float = 0.002
    """'edm': the last sigma before t = 1 (Karras et al. 2022: 0.002)."""
    sigma_max: float = 80.0
    """'edm': the sigma that sets the first step's spacing; sampling still starts at t = 0 (Karras: 80)."""
    cfg_scale: float = 3.1
    """Classifier-free guidance scale inside the interval (PixelREPA-B: 3.1); with a guide model, its weight."""
    interval_min: float = 0.1
    """Guidance applies where t > interval_min (no lower bound when 0)."""
    interval_max: float = 1.0
    """Guidance applies where t < interval_max."""
    batched_guidance: bool = True
    """Conditional and unconditional passes in one forward (False: two calls, as released)."""
    skip_unguided: bool = True
    """Where the scale is 1 (outside the interval) run the conditional pass only (False: both
    passes at every step, as released; the velocity is the same)."""

    def __post_init__(self) -> None:
        _check(self.method in typing.get_args(SamplerMethod),
               f"unknown sampler method '{self.method}' (choose from {', '.join(typing.get_args(SamplerMethod))})")
        _check(self.schedule in typing.get_args(SamplerSchedule),
               f"unknown sampler schedule '{self.schedule}' (choose from {', '.join(typing.get_args(SamplerSchedule))})")
        _check(self.multistep_in in ("t", "log_snr"),
               f"sampler.multistep_in must be 't' or 'log_snr', got '{self.multistep_in}'")
        _check(self.steps >= 1, f"sampler.steps must be >= 1, got {self.steps}")
        _check(self.shift > 0, f"sampler.shift must be > 0, got {self.shift}")
        _check(self.rho > 0, f"sampler.rho must be > 0, got {self.rho}")
        _check(0 < self.sigma_min < self.sigma_max,
               f"sampler.sigma_min {self.sigma_min} and sigma_max {self.sigma_max} must satisfy 0 < min < max")
        _check(0 <= self.interval_min <= self.interval_max <= 1,
               f"CFG interval ({self.interval_min}, {self.interval_max}) must satisfy 0 <= min <= max <= 1")


_WARMUP_EPOCHS = 5.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then constant (SPEC 6)."""

    base_lr: float = 5e-5
    """lr = base_lr * global_batch / 256."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2)."""
    weight_decay: float = 0.0
    """AdamW weight decay; 1-D parameters and biases are never decayed (SPEC 6)."""
    warmup_epochs: float = _WARMUP_EPOCHS
    """Linear warm-up from lr 0 over this many epochs, per iteration (SPEC 6)."""
    warmup_steps: int | None = None
    """Warm-up length in optimiser steps; when set it replaces warmup_epochs, which must then
    stay at its default or 0 (None: warmup_epochs applies)."""
    global_batch: int = 1024
    """Images per optimiser step over all ranks and accumulation micro-steps."""
    epochs: int = 600
    """Training length in epochs when train.steps is None."""
    lr: float | None = None
    """Absolute learning rate; None = base_lr * global_batch / 256."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant (the recipe) or cosine decay to min_lr."""
    min_lr: float = 0.0
    """Final lr of the cosine schedule."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None = no clipping (the recipe)."""

    def __post_init__(self) -> None:
        _check_at_least(self, "optim", 1, "global_batch epochs")
        _check(self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}")
        _check(self.lr is None or self.lr > 0, f"optim.lr must be > 0 (or None: base_lr * global_batch / 256), "
               f"got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas must be two values in [0, 1), got {self.betas}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.min_lr >= 0, f"optim.min_lr must be >= 0, got {self.min_lr}")
        _check(self.grad_clip is None or self.grad_clip > 0,
               f"optim.grad_clip must be > 0 (or None: no clipping), got {self.grad_clip}")
        _check(self.warmup_epochs >= 0, f"optim.warmup_epochs {self.warmup_epochs} is negative")
        _check(self.warmup_steps is None or self.warmup_steps >= 0,
               f"optim.warmup_steps {self.warmup_steps} is negative")
        _check(self.warmup_steps is None or self.warmup_epochs in (0, _WARMUP_EPOCHS),
               f"optim.warmup_steps={self.warmup_steps} and optim.warmup_epochs={self.warmup_epochs} are both "
               "set: keep one (--set optim.warmup_epochs=0 with warmup_steps)")
        _check(self.schedule in ("constant", "cosine"), f"unknown lr schedule '{self.schedule}'")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.global_batch / 256


def default_num_workers() -> int:
    """min(4, the CPUs this process may run on)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, usable)


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from."""

    source: str = ""
    """A pack folder (`pixelrepa data pack`), an ImageNet-layout folder, or 'mnist' /
    'fashion-mnist' (installed IDX files)."""
    hflip: bool = True
    """Random horizontal flips (the recipe); off for digits."""
    allow_empty_classes: bool = False
    """Image folders: keep class sub-folders without a readable image as classes (their index
    stays reserved) instead of refusing the folder."""
    num_workers: int = field(default_factory=lambda: default_num_workers())
    """Loader worker processes: min(4, usable CPUs) by default. How the data is read, not
    which data: a run may resume with another value."""

    def __post_init__(self) -> None:
        _check_at_least(self, "data", 0, "num_workers")


@dataclass(frozen=True)
class TrainConfig:
    """The run itself: length, batch split, parallelism, checkpoints, logging."""

    out_dir: str = "runs/default"
    """The run folder: config, logs, checkpoints, samples."""
    steps: int | None = None
    """Optimiser steps; None = optim.epochs over the data set."""
    per_device_batch: int = 128
    """Micro-batch per process; accumulation = global_batch / (per_device_batch * world)."""
    seed: int = 0
    """Seeds the initialisation, the data order and every step's draws."""
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Data parallelism over processes: 'ddp' (replicated) or 'fsdp2' (sharded per block)."""
    fsdp_bf16: bool | None = None
    """FSDP2 mixed precision: all-gather parameters in bf16, reduce-scatter gradients in fp32
    (MixedPrecisionPolicy); None = on with CUDA, off on the CPU (float32 there)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    log_every: int = 50
    """Log (and check the losses are finite) every this many steps."""
    ckpt_every: int = 1000
    """Write a checkpoint every this many steps (and at the end, and on a stop signal)."""
    keep_last: int = 3
    """Checkpoints kept besides those `keep_every` keeps."""
    keep_every: int | None = None
    """Also keep every checkpoint whose step is a multiple of this."""
    sample_every: int | None = 5000
    """Write a sample grid from EMA 1 every this many steps (None = never)."""
    loggers: tuple[str, ...] = ("tensorboard",)
    """Where rank 0 sends the logged numbers besides OUT/log.jsonl: 'tensorboard', 'wandb' (the
    `pixelrepa[wandb]` extra; also the sample grids and eval.png; WANDB_PROJECT, WANDB_MODE apply)."""
    max_nonfinite_skips: int = 0
    """Steps with a non-finite loss that may be skipped before the run stops."""
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    """Signals on which every rank finishes its step, the run checkpoints and exits (exit
    status 75): what SLURM sends before preemption or at the time limit."""

    def __post_init__(self) -> None:
        _check(self.parallel in ("ddp", "fsdp2"), f"unknown parallel mode '{self.parallel}' (ddp | fsdp2)")
        unknown = [name for name in self.stop_signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        _check(not unknown, f"train.stop_signals: unknown signal(s) {', '.join(unknown)} (e.g. SIGTERM, SIGUSR1)")
        odd = [name for name in self.loggers if name not in ("tensorboard", "wandb")]
        _check(not odd and len(set(self.loggers)) == len(self.loggers),
               f"train.loggers: {', '.join(odd) or 'a repeated name'} in {','.join(self.loggers)}; "
               "choose from tensorboard, wandb (e.g. --set train.loggers=tensorboard,wandb)")
        _check_at_least(self, "train", 1, "steps", unset="unset for optim.epochs")
        _check_at_least(self, "train", 1, "per_device_batch log_every ckpt_every keep_last")
        _check_at_least(self, "train", 1, "keep_every sample_every", unset="None: never")
        _check_at_least(self, "train", 0, "max_nonfinite_skips")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (`pixelrepa.evaluation.live`): EMA 1 scored every N steps."""

    every: int | None = None
    """Score EMA 1 every this many steps during training: FID / KID against `ref`, FD in an
    encoder's space against `encoder_ref`, the alignment probe with `align` (None = never)."""
    images: int = 1000
    """Images sampled per evaluation (fixed noise and class-major labels, split over ranks)."""
    ref: str | None = None
    """Inception reference statistics for FID (`pixelrepa eval ref-stats SRC OUT.npz`, with
    `--keep-features` also KID; or a published file: jit_in256_stats.npz, ADM's VIRTUAL_imagenet256_labeled.npz)."""
    encoder_ref: str | None = None
    """Encoder reference statistics for FD in that encoder's feature space (`pixelrepa eval
    ref-stats SRC OUT.npz --features encoder:NAME`); the encoder is the one that made it."""
    seed: int = 0
    """Sampling seed of the evaluation images (image k's noise from this seed and k)."""
    batch: int = 50
    """Images per sampling and feature batch of an evaluation, per process."""
    align: bool = False
    """Also run the alignment probe at the tap block (`probe align`'s metrics) on a fixed subset
    of `align_images` training images, with the run's alignment encoder."""
    align_images: int = 256
    """Training images (a fixed seeded subset of the pack) the alignment probe uses."""

    def __post_init__(self) -> None:
        _check_at_least(self, "eval", 1, "batch")
        _check_at_least(self, "eval", 1, "every", unset="None: no evaluation")
        _check(self.every is None or self.ref is not None or self.encoder_ref is not None or self.align,
               "eval.every needs something to score against: eval.ref (Inception statistics from "
               "`pixelrepa eval ref-stats SRC OUT.npz --keep-features`), eval.encoder_ref (from `... "
               "--features encoder:NAME`) or eval.align=true")
        _check(self.images >= 2, f"eval.images must be >= 2 (the covariance needs 2), got {self.images}")
        _check(self.align_images >= 2, f"eval.align_images must be >= 2, got {self.align_images}")


@dataclass(frozen=True)
class KernelConfig:
    """How the same math is executed (issue 7): kernels, compilation, optimizer and wrapper
    choices that change float32 rounding at most, never the function. The defaults are the
    fast path; `REFERENCE_PATH` selects what the released code does."""

    attention: AttentionImpl = "auto"
    """How attention is executed (the function is the same): 'reference', float32 logits and
    softmax by explicit matmuls with autocast off and the product with v in v's dtype, the
    released dtype flow (SPEC 7b); 'sdpa', torch's fused kernel, which takes one dtype, so under
    bf16 autocast q and k are rounded to bf16 before the logits (flash kernels; the logits of
    explicit float32 matmuls are not materialised); 'auto', 'sdpa' on accelerators and
    'reference' on the CPU, where it is as fast eagerly and faster compiled (docs/performance.md)."""
    cpu_linear: LinearKernel = "auto"
    """Float32 Linear layers on the CPU: 'onednn' (oneDNN's AVX-512 GEMM, about 2x MKL's
    sgemm on AMD CPUs, where MKL takes its AVX2 path), 'aten' (torch's default BLAS call, as
    fast or faster on Intel CPUs), 'auto' = 'onednn' on AMD CPUs, else 'aten'
    (docs/performance.md, section 3)."""
    compile: CompileMode = "auto"
    """torch.compile: 'model' (the whole network as one graph), 'blocks' (each block on its
    own, as released), 'none'; 'auto' = 'model' on a GPU, and on the CPU 'model' for training
    runs of at least `cpu_compile_min_steps` steps where a C++ compiler is found, else 'none'
    (compiling costs about a minute on the CPU before the first step)."""
    cpu_compile_min_steps: int = 2000
    """Shortest CPU training run that 'auto' compiles: about where compiling pays back at
    JiT-Tiny/4 (docs/performance.md)."""
    encoder_channels_last: bool = True
    """The frozen target encoder's weights in channels-last memory format, the layout oneDNN's
    and cuDNN's convolutions prefer: about 1.5x for EfficientNet-Lite0 on the CPU; for a ViT it
    touches only the patch embedding. False: torch's default (NCHW), as released."""
    cuda_graphs: bool = True
    """Sampling on a GPU with a compiled network: capture it in CUDA graphs
    (torch.compile mode 'reduce-overhead')."""
    fused_optimizer: bool = True
    """AdamW's fused kernel (CPU and GPU); False: torch's default implementation."""
    ddp_find_unused_parameters: bool = False
    """DDP's search for unused parameters after every backward (True as released; not
    needed here, the training module freezes what its mode does not use)."""

    def __post_init__(self) -> None:
        _check(self.attention in ("auto", "sdpa", "reference"),
               f"unknown attention '{self.attention}' (auto | sdpa | reference)")
        _check(self.cpu_linear in ("auto", "onednn", "aten"),
               f"unknown cpu_linear '{self.cpu_linear}' (auto | onednn | aten)")
        _check(self.compile in ("auto", "none", "blocks", "model"),
               f"unknown compile mode '{self.compile}' (auto | none | blocks | model)")
        _check_at_least(self, "kernels", 0, "cpu_compile_min_steps")


REFERENCE_PATH: dict[str, Any] = {
    "kernels.attention": "reference",
    "sampler.batched_guidance": False,
    "sampler.skip_unguided": False,
    "kernels.cpu_linear": "aten",
    "kernels.compile": "blocks",
    "kernels.encoder_channels_last": False,
    "kernels.cuda_graphs": False,
    "kernels.fused_optimizer": False,
    "kernels.ddp_find_unused_parameters": True,
}
"""Overrides that make a run do what the released code does: float32 logits and softmax by
explicit matmuls, separate conditional and unconditional passes at every sampling step,
torch's BLAS linear, an NCHW target encoder, per-block torch.compile (on GPU), default AdamW, DDP with
find_unused_parameters. It is the comparison point of the benchmarks and the parity path."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, composed from the component configs."""

    model: JiTConfig = field(default_factory=JiTConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)

    @property
    def tap_block(self) -> int:
        tap = self.align.tap_block
        return self.model.in_context_start if tap is None else tap

    def __post_init__(self) -> None:
        tap = self.tap_block
        _check(1 <= tap <= self.model.depth, f"tap_block {tap} outside [1, depth={self.model.depth}]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """From `to_dict`'s form; files written before a field moved (`model.attention` to
        `kernels.attention`, ...) are read with it moved (a value at the new place wins)."""
        return from_dict(cls, moved_fields(data))

    def replace(self, **overrides: Any) -> "RunConfig":
        """Dotted overrides, e.g. replace(**{"model.depth": 2, "align.mode": "none"})."""
        return apply_overrides(self, overrides)


