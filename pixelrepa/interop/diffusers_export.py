"""A diffusers pipeline folder of a trained model (`pixelrepa export RUN OUT --diffusers`).

    OUT/model_index.json            JiTPipeline, its components, id2label and the run's sampler settings
    OUT/pipeline_jit.py             the pipeline (remote code)
    OUT/transformer/                config.json, diffusion_pytorch_model.safetensors, transformer_jit.py
    OUT/scheduler/                  scheduler_config.json (the run's solver and time grid, t_eps, noise_scale),
                                    scheduler_jit.py
    OUT/README.md                   how to load it

`diffusers.DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` loads it without pixelrepa:
the three Python files are copied from `diffusers_files/`, which import only torch, diffusers and PIL.
The transformer's configuration fields and weight names follow diffusers' `JiTTransformer2DModel`
(diffusers pull request 13098); `TRANSFORMER_CONFIG` and `_WEIGHT_RULES` are the mapping from ours.
The mask token (the PixelREPA adapter's, unused in sampling) is left out. The scheduler restates
pixelrepa's solvers and time grids (every `sampler.method` and `sampler.schedule`), so every sampler
setting becomes a default of the pipeline; only a setting that cannot sample (a grid with repeated
float32 times) is refused.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from pixelrepa.config import RunConfig
from pixelrepa.extras import MissingExtra
from pixelrepa.files import replace_folder_atomic
from pixelrepa.loading import load_backbone_state
from pixelrepa.sampling import time_grid

CODE = Path(__file__).with_name("diffusers_files")
"""The remote code shipped in every exported folder."""

TRANSFORMER_CONFIG = {"input_size": "sample_size", "patch_size": "patch_size", "in_channels": "in_channels",
                      "hidden_size": "hidden_size", "depth": "num_layers", "num_heads": "num_attention_heads",
                      "mlp_ratio": "mlp_ratio", "attn_drop": "attention_dropout", "proj_drop": "dropout",
                      "num_classes": "num_classes", "bottleneck_dim": "bottleneck_dim",
                      "in_context_len": "in_context_len", "in_context_start": "in_context_start",
                      "norm_eps": "norm_eps"}
"""`JiTConfig` field -> `JiTTransformer2DModel` config field."""

_WEIGHT_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.", "x_embedder."),
    (r"^t_embed\.fc1\.", "t_embedder.mlp.0."),
    (r"^t_embed\.fc2\.", "t_embedder.mlp.2."),
    (r"^y_embed\.table\.", "y_embedder.embedding_table."),
    (r"^in_context\.pos$", "in_context_posemb"),
    (r"^blocks\.(\d+)\.ada\.", r"blocks.\1.adaLN_modulation."),
    (r"^blocks\.(\d+)\.attn\.q_norm\.", r"blocks.\1.attn.norm_q."),
    (r"^blocks\.(\d+)\.attn\.k_norm\.", r"blocks.\1.attn.norm_k."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.to_out.0."),
    (r"^final_layer\.norm\.", "norm_final."),
    (r"^final_layer\.linear\.", "linear_final."),
    (r"^final_layer\.ada\.", "adaLN_modulation_final."),
]
"""Our backbone key -> `JiTTransformer2DModel` key; `attn.qkv` is split into `attn.to_q/to_k/to_v`."""


def transformer_state(state: dict[str, Tensor], in_context_len: int) -> dict[str, Tensor]:
    """Our backbone state under diffusers' names (the fused q/k/v projection split in three)."""
    out = {}
    for key, value in state.items():
        if key == "mask_token" or (key == "in_context.pos" and in_context_len == 0):
            continue
        fused = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if fused:
            block, kind = fused.groups()
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3)):
                out[f"blocks.{block}.attn.{name}.{kind}"] = part.contiguous()
            continue
        for pattern, replacement in _WEIGHT_RULES:
            key = re.sub(pattern, replacement, key)
        out[key] = value.contiguous()
    return out


def export_diffusers(source: str | Path, out: str | Path, ema: int | str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write the pipeline folder of `source` (a run or checkpoint folder: EMA `ema`, default 1; a model
    file; or a Hub id) to `out` and return it; its README loads `repo_id` (default: this folder)."""
    version = _diffusers_version()
    config, state, origin = load_backbone_state(source, ema)
    s = config.sampler
    try:
        time_grid(s)
    except ValueError as err:
        raise ValueError(f"this model's sampler settings cannot be the pipeline's defaults (its default call "
                         f"would fail): {err}") from None
    model = {theirs: getattr(config.model, ours) for ours, theirs in TRANSFORMER_CONFIG.items()}
    weights = transformer_state(state, config.model.in_context_len)
    id2label = {str(k): name for k, name in enumerate(class_names(config, origin))}  # read before the first write
    readme = _readme(config, origin, repo_id)

    def write(out: Path) -> None:
        for folder in (out / "transformer", out / "scheduler"):
            folder.mkdir()
        save_file(weights, str(out / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "transformer" / "config.json",
                    {"_class_name": "JiTTransformer2DModel", "_diffusers_version": version, **model})
        _write_json(out / "scheduler" / "scheduler_config.json",
                    {"_class_name": "JiTFlowScheduler", "_diffusers_version": version, "method": s.method,
                     "multistep_in": s.multistep_in, "schedule": s.schedule, "shift": s.shift, "rho": s.rho,
                     "sigma_min": s.sigma_min, "sigma_max": s.sigma_max,
                     "t_eps": config.objective.t_eps, "noise_scale": config.objective.noise_scale})
        _write_json(out / "model_index.json", {
            "_class_name": ["pipeline_jit", "JiTPipeline"], "_diffusers_version": version,
            "transformer": ["transformer_jit", "JiTTransformer2DModel"],
            "scheduler": ["scheduler_jit", "JiTFlowScheduler"], "id2label": id2label,
            "guidance_scale": s.cfg_scale, "guidance_interval": [s.interval_min, s.interval_max],
            "num_inference_steps": s.steps})
        for name, folder in (("pipeline_jit.py", out), ("transformer_jit.py", out / "transformer"),
                             ("scheduler_jit.py", out / "scheduler")):
            shutil.copyfile(CODE / name, folder / name)
        (out / "README.md").write_text(readme)

    replace_folder_atomic(Path(out), write)
    return Path(out)


def class_names(config: RunConfig, origin: dict) -> list[str]:
    """The run folder's class names (`classes.json`, written by training), else the class indices."""
    if origin["kind"] == "training checkpoint":
        names = Path(origin["path"]).parent.parent / "classes.json"
        if names.is_file():
            try:
                listed = json.loads(names.read_text())
            except ValueError as err:
                raise ValueError(f"{names} is not a JSON list of class names ({err})") from None
            if len(listed) == config.model.num_classes:
                return [str(name) for name in listed]
    return [str(k) for k in range(config.model.num_classes)]


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtra("export --diffusers writes a pipeline for diffusers, which is not installed: "
                           "pip install 'pixelrepa[diffusers]'") from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _readme(config: RunConfig, origin: dict, repo_id: str | None = None) -> str:
    s = config.sampler
    weights = origin.get("weights") or "the model file's"
    solver = f"{s.method} (in {s.multistep_in})" if s.method in ("dpm2m", "dpm3m") else s.method
    grid = {"uniform": "uniform", "shifted": f"shifted (shift {s.shift})",
            "edm": f"edm (rho {s.rho}, sigma {s.sigma_min} to {s.sigma_max})"}[s.schedule]
    return "\n".join([
        "---", "library_name: diffusers", "tags: [pixelrepa, jit, class-conditional-image-generation]", "---", "",
        f"# JiT ({config.align.mode} alignment, {config.model.input_size} px), a diffusers pipeline", "",
        f"Exported by pixelrepa from {weights} weights. The pipeline code ships in this folder:", "",
        "```python", "import torch", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id or "THIS_FOLDER"}", trust_remote_code=True)',
        "images = pipe(class_labels=[0, 1], generator=torch.manual_seed(0)).images", "```", "",
        f"Defaults (the run's sampler): {solver}, {s.steps} steps on the {grid} time grid, guidance {s.cfg_scale} "
        f"on t in ({s.interval_min}, {s.interval_max}); pass `num_inference_steps`, `method`, `schedule`, "
        "`guidance_scale` or `guidance_interval` to change them (the grid's shift, rho and sigmas are scheduler "
        "config).", ""])

