"""Import the authors' released `checkpoint-last.pth` files (SPEC 8), and write a training run back
in that layout (`export_released`).

Two layouts: PixelREPA (`model` has `net.`, `masked_transformer_adapter.`, `repa_model.`;
EMA dicts WITHOUT `net.`) and JiT (`model` has only `net.`; EMA dicts WITH `net.`). A JiT
checkpoint from the JiT authors' own code has no `mask_token`; it is drawn as SPEC 3
initialises it (normal(0, 0.02), from a generator seeded with `MASK_TOKEN_SEED`), the same
value for the raw weights and both EMAs, and the checkpoint's `notes` say so.
Loading is weights-only unpickling with `argparse.Namespace` as the one allowed class.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pixelrepa import checkpoint as ckpt
from pixelrepa.config import AlignConfig, EncoderConfig, RunConfig, apply_overrides, backbone_name, get_preset
from pixelrepa.files import atomic_write

WeightChoice = Literal["raw", "ema1", "ema2"]

NET, ADAPTER, ENCODER = "net.", "masked_transformer_adapter.", "repa_model."
"""Prefixes of the backbone, the adapter and the frozen encoder in the released `model` dict."""
MASK_TOKEN_STD, MASK_TOKEN_SEED = 0.02, 0
"""A missing mask token is drawn normal(0, MASK_TOKEN_STD) (SPEC 3) by a torch.Generator
seeded with MASK_TOKEN_SEED."""

# Released key -> our key, applied in order to backbone and adapter keys.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^x_embedder\.", "patch_embed."),
    (r"^t_embedder\.mlp\.0\.", "t_embed.fc1."),
    (r"^t_embedder\.mlp\.2\.", "t_embed.fc2."),
    (r"^y_embedder\.embedding_table\.", "y_embed.table."),
    (r"^in_context_posemb$", "in_context.pos"),
    (r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.1\.", r"\1.ada."),
    (r"^final_layer\.norm_final\.", "final_layer.norm."),
    (r"^projection_layer\.mlp\.0\.", "head.fc1."),
    (r"^projection_layer\.mlp\.1\.", "head.norm."),
    (r"^projection_layer\.mlp\.3\.", "head.fc2."),
]


# Our key -> released key: `_KEY_RULES` backwards, for writing the released layout.
_RELEASED_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.", "x_embedder."),
    (r"^t_embed\.fc1\.", "t_embedder.mlp.0."),
    (r"^t_embed\.fc2\.", "t_embedder.mlp.2."),
    (r"^y_embed\.table\.", "y_embedder.embedding_table."),
    (r"^in_context\.pos$", "in_context_posemb"),
    (r"^(blocks\.\d+|final_layer)\.ada\.", r"\1.adaLN_modulation.1."),
    (r"^final_layer\.norm\.", "final_layer.norm_final."),
    (r"^head\.fc1\.", "projection_layer.mlp.0."),
    (r"^head\.norm\.", "projection_layer.mlp.1."),
    (r"^head\.fc2\.", "projection_layer.mlp.3."),
]


def released_key_to_ours(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def our_key_to_released(key: str) -> str:
    for pattern, replacement in _RELEASED_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {released_key_to_ours(k): v for k, v in state.items()}


@dataclass
class ReleasedCheckpoint:
    path: Path
    layout: Literal["pixelrepa", "jit"]
    backbone: dict[WeightChoice, dict[str, Tensor]]
    """Backbone state dicts under the released key names, without `net.`."""
    adapter: dict[str, Tensor] | None
    encoder: dict[str, Tensor] | None
    """The frozen encoder (`repa_model.`) under its timm key names."""
    optimizer: dict[str, Any] | None
    """The released AdamW state dict, its parameters numbered as in `trainable`."""
    trainable: list[tuple[str, torch.Size]]
    """(released name, shape) of every trainable parameter of the released module, in its
    `named_parameters()` order: `net.*` except the fixed `pos_embed`, then the adapter."""
    args: argparse.Namespace | None
    epoch: int | None
    notes: list[str]
    """What the reader had to make up (a missing mask token), one line each."""


def read_released_checkpoint(path: str | Path) -> ReleasedCheckpoint:
    """Unpickle weights-only and split into backbone (raw, EMA 1, EMA 2), adapter, encoder
    and optimizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises several types; all mean "not loadable safely"
        raise ValueError(f"cannot load {path} as a released checkpoint with weights-only unpickling "
                         f"(only argparse.Namespace is allowed): {err}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a released checkpoint: expected a dict with a 'model' entry")
    model = ckpt["model"]
    backbone_raw = _strip(model, NET)
    if not backbone_raw:
        raise ValueError(f"{path}: 'model' has no 'net.' keys; not a JiT/PixelREPA checkpoint")
    adapter = _strip(model, ADAPTER) or None
    backbone: dict[WeightChoice, dict[str, Tensor]] = {"raw": backbone_raw}
    for choice, key in (("ema1", "model_ema1"), ("ema2", "model_ema2")):
        if key in ckpt:
            ema = ckpt[key]
            # JiT layout keeps `net.` in its EMA dicts; PixelREPA's drop it.
            backbone[choice] = {k.removeprefix(NET): v for k, v in ema.items()}
    trainable = [(k, v.shape) for k, v in model.items()
                 if (k.startswith(NET) and k != f"{NET}pos_embed") or k.startswith(ADAPTER)]
    layout = "pixelrepa" if adapter is not None else "jit"
    notes = []
    if layout == "jit" and "mask_token" not in backbone_raw and "pos_embed" in backbone_raw:
        notes.append(_add_mask_token(backbone, backbone_raw["pos_embed"]))
    epoch = ckpt.get("epoch")
    return ReleasedCheckpoint(path, layout, backbone, adapter, _strip(model, ENCODER) or None, ckpt.get("optimizer"),
                              trainable, ckpt.get("args"), int(epoch) if epoch is not None else None, notes)


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _add_mask_token(backbone: dict[WeightChoice, dict[str, Tensor]], pos_embed: Tensor) -> str:
    """Put one mask token, drawn as SPEC 3 initialises it, into every backbone state."""
    generator = torch.Generator().manual_seed(MASK_TOKEN_SEED)
    token = (torch.randn(1, 1, pos_embed.shape[-1], generator=generator) * MASK_TOKEN_STD).to(pos_embed.dtype)
    for state in backbone.values():
        state.setdefault("mask_token", token.clone())
    return (f"the backbone has no mask_token (a checkpoint from the JiT authors' code): initialised it "
            f"normal(0, {MASK_TOKEN_STD}) from torch.Generator seed {MASK_TOKEN_SEED} (SPEC 3), the same in "
            "the raw weights and both EMAs")


def sampler_settings(args: argparse.Namespace | None) -> dict[str, Any]:
    """The sampling flags a released run stored in `args` (SPEC 8), as dotted overrides."""
    fields = {"cfg": "sampler.cfg_scale", "interval_min": "sampler.interval_min",
              "interval_max": "sampler.interval_max", "num_sampling_steps": "sampler.steps",
              "sampling_method": "sampler.method"}
    return {ours: getattr(args, theirs) for theirs, ours in fields.items() if hasattr(args, theirs)}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run configuration a released run stored in its `args` (preset + flags)."""
    size = args.model.split("-", 1)[1]  # e.g. 'B/16'
    mta = getattr(args, "mta", None)
    config = get_preset(f"PixelREPA-{size}" if mta else f"JiT-{size}")
    overrides: dict[str, Any] = {
        "model.input_size": args.img_size,
        "model.num_classes": args.class_num,
        "model.attn_drop": args.attn_dropout,
        "model.proj_drop": args.proj_dropout,
        "objective.P_mean": args.P_mean,
        "objective.P_std": args.P_std,
        "objective.t_eps": args.t_eps,
        "objective.noise_scale": args.noise_scale,
        "objective.label_drop_prob": args.label_drop_prob,
        "ema.decays": (args.ema_decay1, args.ema_decay2),
        "optim.base_lr": args.blr,
        "optim.weight_decay": args.weight_decay,
        "optim.warmup_epochs": float(args.warmup_epochs),
        "optim.epochs": args.epochs,
    }
    overrides.update(sampler_settings(args))
    if mta:
        overrides["align.mask_ratio"] = args.patch_mask_ratio
        overrides["align.encoder"] = EncoderConfig(
            name=args.repa_model, img_size=args.repa_image_size, patch_size=args.repa_patch_size,
            feature_dim=config.align.encoder.feature_dim)
    return apply_overrides(config, overrides)


def check_exact(ours: dict[str, Tensor], state: dict[str, Tensor], what: str) -> None:
    """Refuse `state` unless it has exactly the keys and shapes of `ours`, naming the first
    (in checkpoint order) mis-shaped, unexpected or missing key."""
    for key, value in state.items():
        if key not in ours:
            raise ValueError(f"{what}: checkpoint has '{key}' {tuple(value.shape)} that the chosen "
                             "configuration lacks")
        if value.shape != ours[key].shape:
            raise ValueError(f"{what}: '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(ours[key].shape)} in the chosen configuration; pass the matching "
                             "configuration explicitly")
    missing = [key for key in ours if key not in state]
    if missing:
        raise ValueError(f"{what}: checkpoint lacks '{missing[0]}' {tuple(ours[missing[0]].shape)} that the "
                         f"chosen configuration needs ({len(missing)} such keys)")


def load_exact(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Strict load that names the first mismatching key (see `check_exact`)."""
    check_exact(module.state_dict(), state, what)
    module.load_state_dict(state)


def import_released(source: str | Path | ReleasedCheckpoint, config: RunConfig | None = None,
                    weights: WeightChoice = "ema1") -> tuple[RunConfig, nn.Module, nn.Module | None]:
    """Build (config, backbone, adapter or None) from a released checkpoint (a path, or one
    already read by `read_released_checkpoint`).

    `config=None` recovers the configuration from the checkpoint's `args`; a configuration
    that does not fit the weights is refused with the first mismatching key and both shapes.
    """
    from pixelrepa.align.heads import MaskedTransformerAdapter
    from pixelrepa.models.jit import JiT

    ckpt = source if isinstance(source, ReleasedCheckpoint) else read_released_checkpoint(source)
    if config is None:
        if ckpt.args is None:
            raise ValueError(f"{ckpt.path} stores no 'args'; pass the configuration (a preset or config file)")
        config = config_from_args(ckpt.args)
    if weights not in ckpt.backbone:
        raise ValueError(f"{ckpt.path} has no '{weights}' weights (available: {', '.join(ckpt.backbone)})")
    if ckpt.layout == "jit" and config.align.mode == "pixelrepa":
        config = apply_overrides(config, {"align": AlignConfig(mode="none", weight=0.0)})
    net = JiT(config.model)
    load_exact(net, convert_state_dict(ckpt.backbone[weights]), f"backbone ({weights})")
    adapter = None
    if ckpt.adapter is not None and config.align.mode == "pixelrepa":
        adapter = MaskedTransformerAdapter(config.model, config.align)
        load_exact(adapter, convert_state_dict(ckpt.adapter), "adapter")
    return config, net, adapter


def export_encoder(ckpt: ReleasedCheckpoint, path: str | Path) -> Path:
    """Write the frozen encoder a PixelREPA checkpoint was trained against (SPEC 8) as an
    encoder file that `align.encoder.weights` takes, recording the timm name, image size
    and patch size from `args` (`repa_model`, `repa_image_size`, `repa_patch_size`)."""
    from pixelrepa.weights import save_encoder_file

    if ckpt.encoder is None:
        raise ValueError(f"{ckpt.path} holds no encoder ('repa_model.' keys): only PixelREPA checkpoints do")
    needed = ("repa_model", "repa_image_size", "repa_patch_size")
    lacking = [name for name in needed if not hasattr(ckpt.args, name)]
    if lacking:
        raise ValueError(f"{ckpt.path}: the stored args lack '{lacking[0]}', needed to record how the encoder "
                         "was built")
    args = ckpt.args
    return save_encoder_file(path, ckpt.encoder, args.repa_model, args.repa_image_size, args.repa_patch_size,
                             provenance={"source": str(ckpt.path), "epoch": str(ckpt.epoch)})


def config_from_constructor_kwargs(net: dict[str, Any], adapter: dict[str, Any] | None = None,
                                   **constants: Any) -> RunConfig:
    """A RunConfig from the released constructors' keyword arguments (as in the parity
    fixtures' config.json) plus loss constants (P_mean, P_std, t_eps, noise_scale,
    mask_ratio, align_weight)."""
    base = RunConfig()
    overrides: dict[str, Any] = {f"model.{k}": v for k, v in net.items()}
    for name in ("P_mean", "P_std", "t_eps", "noise_scale"):
        if name in constants:
            overrides[f"objective.{name}"] = constants[name]
    if adapter is None:
        overrides.update({"align.mode": "none", "align.weight": 0.0})
    else:
        overrides.update({
            "align.mode": "pixelrepa",
            "align.adapter_depth": adapter["depth"],
            "align.adapter_in_context_len": adapter["in_context_len"],
            "align.encoder": EncoderConfig(img_size=net["input_size"], feature_dim=adapter["out_channels"]),
        })
        if "mask_ratio" in constants:
            overrides["align.mask_ratio"] = constants["mask_ratio"]
        if "align_weight" in constants:
            overrides["align.weight"] = constants["align_weight"]
    return apply_overrides(base, overrides)


RELEASED_NORMALISERS = {"de_scale.mean": (0.5, 0.5, 0.5), "de_scale.std": (0.5, 0.5, 0.5),
                        "scale.mean": (0.485, 0.456, 0.406), "scale.std": (0.229, 0.224, 0.225)}
"""The released training module's fixed image-normalisation buffers ([-1, 1] -> [0, 1] -> ImageNet
statistics for the encoder), each stored as (1, 3, 1, 1)."""


_RELEASED_RANK = {
    "net": 0, "masked_transformer_adapter": 1,
    "pos_embed": 0, "in_context_posemb": 1, "mask_token": 2,
    "t_embedder": 10, "y_embedder": 11, "x_embedder": 12, "blocks": 13, "final_layer": 14, "projection_layer": 14,
    "norm1": 0, "attn": 1, "norm2": 2, "mlp": 3, "adaLN_modulation": 4,
    "q_norm": 0, "k_norm": 1, "qkv": 2, "proj": 3, "proj1": 0, "proj2": 1, "w12": 0, "w3": 1,
    "norm_final": 0, "linear": 1, "embedding_table": 0, "weight": 0, "bias": 1,
}
"""Where each name part comes among its siblings in the released modules (`model_pixelREPA.py`):
a module's own parameters first, then its children in the order `__init__` creates them."""


def released_parameter_order(names: list[str]) -> list[str]:
    """Released parameter names in the released training module's `named_parameters()` order,
    the order its AdamW numbers them."""
    def rank(name: str) -> tuple[int, ...]:
        try:
            return tuple(int(part) if part.isdigit() else _RELEASED_RANK[part] for part in name.split("."))
        except KeyError as err:
            raise ValueError(f"'{name}': no place known for '{err.args[0]}' in the released modules") from None

    return sorted(names, key=rank)


def released_optimizer(optimizer: dict[str, Any], trainable: dict[str, Tensor], config: RunConfig) -> dict[str, Any]:
    """The run's AdamW state (`get_optimizer_state_dict` layout, keyed by our names) as the released
    training script's optimizer saves it: `trainable` (the released module's trainable parameters
    by released name) numbered in `released_parameter_order`, split as `misc.add_weight_decay` splits
    them ([1-D and `.bias`, no decay], [the rest, `optim.weight_decay`]); the hyperparameters are the
    ones the released script's `AdamW(groups, lr, betas)` has, at the run's last lr."""
    ours = {}
    for name in optimizer["state"]:
        prefix, rest = name.split(".", 1)
        ours[(NET if prefix == "net" else ADAPTER) + our_key_to_released(rest)] = optimizer["state"][name]
    order = released_parameter_order(list(trainable))
    exempt = {name for name in order if trainable[name].ndim == 1 or name.endswith(".bias")}  # as training.optim
    numbered = [name for name in order if name in exempt] + [name for name in order if name not in exempt]
    groups = [{"params": [torch.zeros(1)], "weight_decay": 0.0},
              {"params": [torch.zeros(1)], "weight_decay": config.optim.weight_decay}]
    template = torch.optim.AdamW(groups, lr=optimizer["param_groups"][0]["lr"], betas=config.optim.betas)
    param_groups = []
    start = 0
    for group, size in zip(template.state_dict()["param_groups"], (len(exempt), len(numbered) - len(exempt))):
        param_groups.append({**group, "params": list(range(start, start + size))})
        start += size
    return {"state": {index: ours[name] for index, name in enumerate(numbered) if name in ours},
            "param_groups": param_groups}


def export_released(checkpoint: str | Path, path: str | Path) -> Path:
    """Write a training checkpoint (a run folder: its latest) as the released `checkpoint-last.pth`
    (SPEC 8): `model` (the raw weights), `model_ema1`, `model_ema2`, `optimizer`, `epoch` and `args`,
    with the released key names.

    A PixelREPA run gets the PixelREPA layout that the authors' `main_pixelREPA.py --resume DIR
    --evaluate_gen` loads strictly: `net.`, the frozen encoder under `repa_model.` (built here
    from `align.encoder`, which must be available offline), the normalisation buffers and the adapter
    under `masked_transformer_adapter.`, EMA dicts without `net.`. Runs without alignment or with
    REPA get the JiT layout (`net.` only, EMA dicts with `net.`) without the mask token, which the
    JiT authors' model lacks; the REPA projector is left out. `epoch` is the last completed epoch
    (the released `--resume` continues at epoch + 1). `optimizer` is `released_optimizer`: the
    released `--resume` loads it and continues with the run's AdamW moments."""
    folder = ckpt.find_checkpoint(checkpoint)
    loaded = ckpt.load_checkpoint(folder)
    config = loaded.config
    if len(config.ema.decays) != 2:
        raise ValueError(f"{folder} tracks {len(config.ema.decays)} EMA(s); the released layout holds exactly two "
                         "(model_ema1, model_ema2)")
    state = ckpt.read_state(folder, ("model", "ema1", "ema2", "optimizer"))
    raw = {k[len(NET):]: v for k, v in state["model"].items() if k.startswith(NET)}
    head = {k[len("head."):]: v for k, v in state["model"].items() if k.startswith("head.")}
    emas = [{**raw, **state[f"ema{k}"]} for k in (1, 2)]
    pixelrepa_layout = config.align.mode == "pixelrepa"
    if not pixelrepa_layout:
        raw, *emas = [{k: v for k, v in s.items() if k != "mask_token"} for s in (raw, *emas)]

    def released(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """`state` under the released names, in the released module's order (as its state dict is)."""
        renamed = {prefix + our_key_to_released(k): v.clone() for k, v in state.items()}
        return {k: renamed[k] for k in released_parameter_order(list(renamed))}

    model = released(raw, NET)
    if pixelrepa_layout:
        model.update({ENCODER + k: v for k, v in _encoder_state(config).items()})
        model.update({k: torch.tensor(v).view(1, 3, 1, 1) for k, v in RELEASED_NORMALISERS.items()})
        model.update(released(head, ADAPTER))
    ema_prefix = "" if pixelrepa_layout else NET
    epochs_done = loaded.train_state.get("data_position", {}).get("epoch", loaded.train_state.get("epoch", 0))
    trainable = {k: v for k, v in model.items() if k.startswith(ADAPTER) or (k.startswith(NET) and k != f"{NET}pos_embed")}
    contents = {"model": model, "model_ema1": released(emas[0], ema_prefix),
                "model_ema2": released(emas[1], ema_prefix),
                "optimizer": released_optimizer(state["optimizer"], trainable, config), "epoch": epochs_done - 1,
                "args": released_args(config, backbone_name(config.model))}
    atomic_write(Path(path), lambda tmp: torch.save(contents, tmp))
    return Path(path)


def _encoder_state(config: RunConfig) -> dict[str, Tensor]:
    """The frozen encoder's state under its timm key names, as the released module holds it."""
    from pixelrepa.align.encoders import build_encoder

    try:
        return build_encoder(config.align.encoder).model.state_dict()
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"the PixelREPA layout holds the frozen encoder ('repa_model.'), which the authors' script "
                         f"loads strictly, and {config.align.encoder.name} cannot be built here: {err}; set "
                         "align.encoder.weights to a local file (`--encoder-weights`)") from None


def released_args(config: RunConfig, backbone: str | None) -> argparse.Namespace:
    """The released training flags (main_pixelREPA.py's parser) of a run: what `config_from_args`
    reads back, with the released defaults for what a pixelrepa run has no counterpart of. `backbone`
    is the registered backbone name (`JiT-B/16`); without one, `args.model` is 'JiT-custom' and importing
    needs the configuration (--preset / --config)."""
    size = backbone.split("-", 1)[1] if backbone else "custom"
    o, s, e = config.optim, config.sampler, config.align.encoder
    warmup = int(o.warmup_epochs) if float(o.warmup_epochs).is_integer() else o.warmup_epochs
    args = argparse.Namespace(
        model=f"JiT-{size}", img_size=config.model.input_size, attn_dropout=config.model.attn_drop,
        proj_dropout=config.model.proj_drop, patch_mask_ratio=config.align.mask_ratio, epochs=o.epochs,
        warmup_epochs=warmup, batch_size=o.global_batch, lr=o.peak_lr, blr=o.base_lr, min_lr=o.min_lr,
        lr_schedule=o.schedule, weight_decay=o.weight_decay, ema_decay1=config.ema.decays[0],
        ema_decay2=config.ema.decays[1], P_mean=config.objective.P_mean, P_std=config.objective.P_std,
        noise_scale=config.objective.noise_scale, t_eps=config.objective.t_eps,
        label_drop_prob=config.objective.label_drop_prob, seed=config.train.seed, start_epoch=0, num_workers=12,
        pin_mem=True, repa_model=e.name, repa_image_size=e.img_size, repa_patch_size=e.patch_size,
        sampling_method=s.method, num_sampling_steps=s.steps, cfg=s.cfg_scale, interval_min=s.interval_min,
        interval_max=s.interval_max, num_images=50000, eval_freq=40, online_eval=False, evaluate_gen=False,
        gen_bsz=256, data_path=config.data.source, class_num=config.model.num_classes,
        output_dir=config.train.out_dir, resume="", save_last_freq=5, log_freq=100, device="cuda", world_size=1,
        local_rank=-1, dist_on_itp=False, dist_url="env://")
    if config.align.mode == "pixelrepa":
        args.mta = f"MTA-{size}"
    return args
