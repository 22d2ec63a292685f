"""Typed configuration: presets from the SPEC tables, recipe defaults, overrides, round trip."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from pixelrepa.config import (
    AlignConfig,
    EMAConfig,
    JiTConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    SamplerConfig,
    get_preset,
    list_presets,
)

# SPEC 3 table: depth, width, heads, bottleneck, in-context start.
TABLE = {
    "B": (12, 768, 12, 128, 4),
    "L": (24, 1024, 16, 128, 8),
    "H": (32, 1280, 16, 256, 10),
    "G": (40, 1664, 16, 256, 10),
}


@pytest.mark.parametrize("family", ["JiT", "PixelREPA", "REPA"])
@pytest.mark.parametrize("size", list(TABLE))
@pytest.mark.parametrize("patch,resolution,noise", [(16, 256, 1.0), (32, 512, 2.0)])
def test_presets_follow_spec_table(family, size, patch, resolution, noise):
    cfg = get_preset(f"{family}-{size}/{patch}")
    m = cfg.model
    assert (m.depth, m.hidden_size, m.num_heads, m.bottleneck_dim, m.in_context_start) == TABLE[size]
    assert (m.patch_size, m.input_size) == (patch, resolution)
    assert m.in_context_len == 32 and m.mlp_ratio == 4.0 and m.in_channels == 3
    assert m.num_classes == 1000
    assert m.grid_size == resolution // patch == 16
    assert cfg.objective.noise_scale == noise
    # SPEC 3: H trains with projection dropout 0.2 and no attention-probability dropout.
    assert m.proj_drop == (0.2 if size == "H" else 0.0)
    assert m.attn_drop == 0.0
    assert cfg.tap_block == m.in_context_start
    mode = {"JiT": "none", "PixelREPA": "pixelrepa", "REPA": "repa"}[family]
    assert cfg.align.mode == mode
    assert cfg.align.weight == {"none": 0.0, "pixelrepa": 0.1, "repa": 0.5}[mode]


@pytest.mark.parametrize("size,cfg_pixelrepa,cfg_jit", [("B", 3.1, 3.0), ("L", 2.8, 2.4), ("H", 2.4, 2.2)])
def test_released_cfg_scales(size, cfg_pixelrepa, cfg_jit):
    assert get_preset(f"PixelREPA-{size}/16").sampler.cfg_scale == cfg_pixelrepa
    assert get_preset(f"JiT-{size}/16").sampler.cfg_scale == cfg_jit


@pytest.mark.parametrize("size,cfg_jit", [("B", 3.0), ("L", 2.5), ("H", 2.3)])
def test_jit_512px_cfg_scales(size, cfg_jit):
    """The JiT authors' published scales at 512 px differ from their 256-px ones (SPEC 7)."""
    assert get_preset(f"JiT-{size}/32").sampler.cfg_scale == cfg_jit
    assert get_preset(f"REPA-{size}/32").sampler.cfg_scale == cfg_jit


def test_recipe_defaults():
    cfg = get_preset("PixelREPA-B/16")
    o = cfg.objective
    assert (o.P_mean, o.P_std, o.t_eps, o.label_drop_prob, o.noise_scale) == (-0.8, 0.8, 0.05, 0.1, 1.0)
    a = cfg.align
    assert (a.mode, a.weight, a.mask_ratio, a.adapter_depth, a.adapter_in_context_len) == ("pixelrepa", 0.1, 0.2, 2, 32)
    assert a.skip_head_if_same_width is True and a.projector_hidden == 2048
    assert a.encoder.name == "vit_base_patch14_dinov2.lvd142m"
    assert (a.encoder.img_size, a.encoder.patch_size, a.encoder.feature_dim) == (256, 16, 768)
    assert cfg.ema.decays == (0.9999, 0.9996)
    s = cfg.sampler
    assert (s.method, s.steps, s.interval_min, s.interval_max, s.cfg_scale) == ("heun", 50, 0.1, 1.0, 3.1)
    opt = cfg.optim
    assert opt.betas == (0.9, 0.95) and opt.weight_decay == 0.0 and opt.warmup_epochs == 5
    assert opt.global_batch == 1024 and opt.epochs == 600
    assert opt.base_lr * opt.global_batch / 256 == pytest.approx(2e-4)
    assert get_preset("REPA-B/16").align.weight == 0.5
    assert get_preset("JiT-B/16").align.mode == "none"
    # The bare RunConfig defaults are the PixelREPA-B/16 recipe too.
    assert RunConfig().align.weight == 0.1 and RunConfig().sampler.steps == 50
    assert RunConfig().model == get_preset("JiT-B/16").model


def test_preset_lookup():
    names = list_presets()
    assert names == sorted(names)
    for required in ("JiT-B/16", "JiT-H/32", "PixelREPA-L/16", "REPA-G/32", "PixelREPA-Micro/8"):
        assert required in names
    assert get_preset("MTA-B/16") == get_preset("PixelREPA-B/16")
    assert get_preset("PixelREPA-B/16") == get_preset("PixelREPA-B/16")  # fresh, equal each time
    with pytest.raises(KeyError, match="JiT-X/16"):
        get_preset("JiT-X/16")


def test_list_presets_lists_exactly_the_names_get_preset_takes():
    """Every family x size x patch (the released MTA adapter names too) and the demo: those that
    `get_preset` takes are the listed ones, and each listed one builds."""
    families = ("JiT", "PixelREPA", "REPA", "iREPA", "MTA")
    sizes = ("B", "L", "H", "G", "S", "Tiny", "Micro", "Demo")
    candidates = {f"{family}-{size}{patch}" for family in families for size in sizes
                  for patch in ("", "/4", "/8", "/16", "/32")}
    accepted = set()
    for name in candidates:
        try:
            get_preset(name)
        except KeyError:
            continue
        accepted.add(name)
    listed = list_presets()
    assert set(listed) <= candidates and accepted == set(listed)
    assert {"MTA-B/16", "MTA-H/32", "PixelREPA-Demo", "iREPA-B/16", "iREPA-Tiny/4"} <= accepted
    assert get_preset("MTA-L/32") == get_preset("PixelREPA-L/32")

def test_configs_are_frozen():
    cfg = get_preset("JiT-B/16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.depth = 3  # type: ignore[misc]
    assert get_preset("JiT-B/16").model.depth == 12


def test_dotted_overrides_with_string_coercion():
    base = get_preset("PixelREPA-B/16")
    cfg = base.replace(**{
        "model.depth": "6",
        "model.in_context_start": "2",
        "objective.P_std": "1.5",
        "objective.noise_scale": "2",
        "sampler.batched_guidance": "false",
        "sampler.method": "euler",
        "ema.decays": "0.99, 0.9",
        "optim.betas": "(0.8, 0.9)",
        "align.tap_block": "3",
        "align.encoder.feature_dim": "384",
        "ema.warmup": "yes",
    })
    assert cfg.model.depth == 6 and isinstance(cfg.model.depth, int)
    assert cfg.objective.P_std == 1.5 and isinstance(cfg.objective.P_std, float)
    assert cfg.objective.noise_scale == 2.0 and isinstance(cfg.objective.noise_scale, float)
    assert cfg.sampler.batched_guidance is False
    assert cfg.ema.warmup is True
    assert cfg.sampler.method == "euler"
    assert cfg.ema.decays == (0.99, 0.9)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.align.tap_block == 3 and cfg.tap_block == 3
    assert cfg.align.encoder.feature_dim == 384
    # Untouched fields keep their values; the original is unchanged.
    assert cfg.model.hidden_size == 768 and cfg.align.encoder.name == base.align.encoder.name
    assert base.model.depth == 12 and base.sampler.batched_guidance is True
    # Non-string values pass through.
    assert base.replace(**{"model.depth": 8, "ema.decays": [0.5]}).ema.decays == (0.5,)
    assert base.replace(**{"align.tap_block": "none"}).align.tap_block is None


def test_values_take_the_type_of_the_field_annotation():
    """The type comes from the annotation, not from the current value (None says nothing)."""
    base = get_preset("PixelREPA-B/16")
    cfg = base.replace(**{"train.keep_every": "1e3", "align.encoder.weights": "123", "train.steps": "2000",
                          "optim.grad_clip": "1", "optim.lr": "2e-4", "train.sample_every": "none"})
    assert cfg.train.keep_every == 1000 and type(cfg.train.keep_every) is int
    assert cfg.align.encoder.weights == "123"
    assert cfg.train.steps == 2000 and type(cfg.train.steps) is int
    assert cfg.optim.grad_clip == 1.0 and type(cfg.optim.grad_clip) is float
    assert cfg.optim.lr == 2e-4 and cfg.train.sample_every is None
    # A config file's values are checked the same way (YAML reads 1e3 as a string).
    loaded = RunConfig.from_dict({"train": {"keep_every": "1e3", "steps": 500.0}, "model": {"depth": 6}})
    assert (loaded.train.keep_every, type(loaded.train.steps)) == (1000, int)
    for path, value in (("train.keep_every", "1.5"), ("model.depth", True), ("ema.decays", "a, b"),
                        ("optim.betas", "0.9"), ("align.encoder.weights", ["x"])):
        with pytest.raises(ValueError, match=re.escape(path)):
            base.replace(**{path: value})


@pytest.mark.parametrize("overrides,needle", [({"align.weight": -0.1}, "negative"),
                                              ({"optim.warmup_epochs": -1}, "negative")])
def test_negative_alignment_weight_or_warmup_refused(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        get_preset("PixelREPA-B/16").replace(**overrides)


def test_overrides_to_one_component_are_validated_together():
    base = RunConfig()
    with pytest.raises(ValueError):
        base.replace(**{"model.hidden_size": 80})  # 80 is not divisible by 12 heads
    cfg = base.replace(**{"model.hidden_size": 80, "model.num_heads": 5})
    assert (cfg.model.hidden_size, cfg.model.num_heads) == (80, 5)


@pytest.mark.parametrize("path,named", [("model.dept", "model.dept"), ("sampler.cfg", "sampler.cfg"),
                                        ("align.encoder.dim", "align.encoder.dim"), ("modle.depth", "modle"),
                                        ("foo", "foo")])
def test_unknown_override_names_the_field(path, named):
    with pytest.raises(ValueError, match=f"'{re.escape(named)}'"):
        RunConfig().replace(**{path: 1})


def test_unparsable_override_value():
    with pytest.raises(ValueError, match="model.depth"):
        RunConfig().replace(**{"model.depth": "twelve"})
    with pytest.raises(ValueError, match="sampler.batched_guidance"):
        RunConfig().replace(**{"sampler.batched_guidance": "maybe"})


@pytest.mark.parametrize("name", list_presets())
def test_dict_round_trip(name):
    cfg = get_preset(name).replace(**{"align.tap_block": 2, "ema.warmup": True})
    data = cfg.to_dict()
    assert data["model"]["depth"] == cfg.model.depth
    assert data["align"]["encoder"]["name"] == cfg.align.encoder.name
    assert RunConfig.from_dict(data) == cfg
    assert RunConfig.from_dict(json.loads(json.dumps(data))) == cfg  # tuples survive JSON as lists


def test_from_dict_partial_and_unknown():
    cfg = RunConfig.from_dict({"model": {"depth": 6}, "sampler": {"steps": 10}})
    assert cfg.model.depth == 6 and cfg.model.hidden_size == 768 and cfg.sampler.steps == 10
    with pytest.raises(ValueError, match="bogus"):
        RunConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="wdith"):
        RunConfig.from_dict({"model": {"wdith": 1}})
    with pytest.raises(ValueError, match="colour"):
        RunConfig.from_dict({"align": {"encoder": {"colour": "red"}}})


@pytest.mark.parametrize("overrides,needle", [
    ({"model.hidden_size": 100}, "divisible"),
    ({"model.input_size": 250}, "multiple"),
    ({"model.hidden_size": 72, "model.num_heads": 12}, "RoPE"),  # head size 6
    ({"model.in_context_start": 13}, "in_context_start"),
    ({"kernels.attention": "flash"}, "flash"),
    ({"model.attention": "sdpa"}, "now 'kernels.attention'"),
    ({"align.mode": "dino"}, "dino"),
    ({"align.mask_ratio": 1.0}, "mask_ratio"),
    ({"align.mask_ratio": -0.1}, "mask_ratio"),
    ({"align.tap_block": 0}, "tap_block"),
    ({"align.tap_block": 13}, "tap_block"),
    ({"sampler.steps": 0}, "steps"),
    ({"sampler.method": "ddim"}, "ddim"),
])
def test_invalid_values_raise_clear_errors(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        RunConfig().replace(**overrides)


@pytest.mark.parametrize("overrides", [
    {"objective.label_drop_prob": 1.5},
    {"objective.t_eps": 0.0},  # v = (x - z) / max(1 - t, 0) divides by zero at t = 1
    {"objective.P_std": -0.8},
    {"ema.decays": (1.5,)},
    {"sampler.interval_min": 0.9, "sampler.interval_max": 0.1},
])
def test_invalid_recipe_values_are_rejected(overrides):
    with pytest.raises(ValueError):
        RunConfig().replace(**overrides)


def test_component_constructors_validate():
    with pytest.raises(ValueError):
        JiTConfig(hidden_size=64, num_heads=3)
    with pytest.raises(ValueError):
        AlignConfig(mode="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SamplerConfig(steps=-1)
    with pytest.raises(ValueError):
        RunConfig(model=JiTConfig(depth=2, in_context_start=2), align=AlignConfig(tap_block=3))
    # Valid edge cases are accepted.
    JiTConfig(depth=2, in_context_start=2)
    AlignConfig(mask_ratio=0.0)
    SamplerConfig(steps=1)
    ObjectiveConfig()
    EMAConfig(decays=(0.5,))
    OptimConfig()


NONSENSE = [
    ("train.steps", 0, "train.steps must be >= 1 (or unset for optim.epochs), got 0"),
    ("train.steps", -5, "train.steps must be >= 1 (or unset for optim.epochs), got -5"),
    ("train.log_every", 0, "train.log_every must be >= 1, got 0"),
    ("train.ckpt_every", 0, "train.ckpt_every must be >= 1, got 0"),
    ("train.keep_last", 0, "train.keep_last must be >= 1, got 0"),
    ("train.keep_every", 0, "train.keep_every must be >= 1 (or None: never), got 0"),
    ("train.sample_every", 0, "train.sample_every must be >= 1 (or None: never), got 0"),
    ("eval.every", 0, "eval.every must be >= 1 (or None: no evaluation), got 0"),
    ("train.per_device_batch", 0, "train.per_device_batch must be >= 1, got 0"),
    ("eval.batch", 0, "eval.batch must be >= 1, got 0"),
    ("eval.images", 1, "eval.images must be >= 2"),
    ("train.max_nonfinite_skips", -1, "train.max_nonfinite_skips must be >= 0, got -1"),
    ("optim.global_batch", 0, "optim.global_batch must be >= 1, got 0"),
    ("optim.epochs", 0, "optim.epochs must be >= 1, got 0"),
    ("optim.lr", 0.0, "optim.lr must be > 0 (or None: base_lr * global_batch / 256), got 0.0"),
    ("optim.base_lr", -1e-4, "optim.base_lr must be > 0, got -0.0001"),
    ("optim.betas", (0.9, 1.0), "optim.betas must be two values in [0, 1), got (0.9, 1.0)"),
    ("optim.weight_decay", -0.1, "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.min_lr", -1e-6, "optim.min_lr must be >= 0, got -1e-06"),
    ("optim.grad_clip", 0.0, "optim.grad_clip must be > 0 (or None: no clipping), got 0.0"),
    ("optim.warmup_steps", -1, "optim.warmup_steps -1 is negative"),
    ("data.num_workers", -1, "data.num_workers must be >= 0, got -1"),
    ("ema.decays", (0.9999, 0.0), "ema.decays must each be in (0, 1), got (0.9999, 0.0)"),
    ("ema.decays", (1.0,), "ema.decays must each be in (0, 1), got (1.0,)"),
    ("align.mask_ratio", 1.0, "align.mask_ratio must be in [0, 1), got 1.0"),
    ("align.adapter_depth", 0, "align.adapter_depth must be >= 1, got 0"),
    ("align.projector_hidden", 0, "align.projector_hidden must be >= 1, got 0"),
    ("align.adapter_in_context_len", -1, "align.adapter_in_context_len must be >= 0, got -1"),
    ("align.encoder.img_size", 0, "align.encoder.img_size must be >= 1, got 0"),
    ("align.encoder.feature_dim", 0, "align.encoder.feature_dim must be >= 1, got 0"),
    ("model.patch_size", 0, "model.patch_size must be >= 1, got 0"),  # was a ZeroDivisionError
    ("model.num_heads", 0, "model.num_heads must be >= 1, got 0"),
    ("model.depth", 0, "model.depth must be >= 1, got 0"),
    ("model.num_classes", 0, "model.num_classes must be >= 1, got 0"),
    ("model.mlp_ratio", 0.0, "model.mlp_ratio must be > 0, got 0.0"),
    ("model.proj_drop", 1.0, "model.proj_drop must be in [0, 1), got 1.0"),
    ("model.norm_eps", 0.0, "model.norm_eps must be > 0, got 0.0"),
    ("sampler.steps", 0, "sampler.steps must be >= 1, got 0"),
    ("kernels.cpu_compile_min_steps", -1, "kernels.cpu_compile_min_steps must be >= 0, got -1"),
]


@pytest.mark.parametrize("path,value,message", NONSENSE, ids=[f"{p}={v}" for p, v, _ in NONSENSE])
def test_values_that_make_no_sense_are_refused_by_name(path, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        get_preset("JiT-Micro/8").replace(**{path: value})


@pytest.mark.parametrize("path", ["train.steps", "train.keep_every", "train.sample_every", "eval.every",
                                  "optim.lr", "optim.grad_clip", "optim.warmup_steps"])
def test_none_still_means_unset_or_never(path):
    assert get_preset("JiT-Micro/8").replace(**{path: None}).to_dict()[path.split(".")[0]][path.split(".")[1]] is None


def test_the_command_line_refuses_steps_0(capsys):
    from pixelrepa.cli.main import main

    assert main(["train", "--preset", "JiT-Micro/8", "--steps", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == ("pixelrepa train: error: train.steps must be >= 1 (or unset for "
                                               "optim.epochs), got 0")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    assert get_preset(name).train.log_every >= 1


def test_files_from_before_attention_moved_to_kernels_still_load():
    old = RunConfig().to_dict()
    old["model"]["attention"] = "reference"
    del old["kernels"]["attention"]
    loaded = RunConfig.from_dict(old)
    assert loaded.kernels.attention == "reference" and loaded.model == RunConfig().model
    both = RunConfig().replace(**{"kernels.attention": "sdpa"}).to_dict()
    both["model"]["attention"] = "reference"
    assert RunConfig.from_dict(both).kernels.attention == "sdpa"  # a choice in kernels wins


EVAL_SETTINGS = {"every": 500, "images": 64, "ref": "ref.npz", "encoder_ref": "lite0.npz", "seed": 3, "batch": 16,
                 "align": True, "align_images": 32}


def old_layout(config: RunConfig) -> dict:
    """`config.to_dict()` as files written before the evaluation fields moved to `eval` hold it."""
    data = config.to_dict()
    data["train"].update({f"eval_{name}": value for name, value in data.pop("eval").items()})
    return data


def test_evaluation_settings_round_trip():
    cfg = get_preset("JiT-Micro/8").replace(**{f"eval.{k}": v for k, v in EVAL_SETTINGS.items()})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["eval"] == EVAL_SETTINGS and not any(k.startswith("eval") for k in data["train"])
    assert RunConfig.from_dict(data) == cfg


def test_files_from_before_the_evaluation_fields_moved_still_load(tmp_path):
    new = get_preset("JiT-Micro/8").replace(**{f"eval.{k}": v for k, v in EVAL_SETTINGS.items()})
    old = old_layout(new)
    assert old["train"]["eval_every"] == 500 and "eval" not in old
    assert RunConfig.from_dict(old) == new
    # Through --config too (a full file, and a file of changes to a preset).
    from pixelrepa.cli.common import config_from_file

    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_from_file(tmp_path / "config.json") == new
    (tmp_path / "changes.yaml").write_text("train:\n  eval_every: 7\n  eval_ref: r.npz\n")
    loaded = config_from_file(tmp_path / "changes.yaml", get_preset("JiT-Micro/8"))
    assert (loaded.eval.every, loaded.eval.ref, loaded.eval.images) == (7, "r.npz", 1000)
    # A value at the new place wins over one at the old place.
    both = {**old, "eval": {"every": 9}}
    assert RunConfig.from_dict(both).eval.every == 9 and RunConfig.from_dict(both).eval.ref == "ref.npz"
    assert old["train"]["eval_every"] == 500  # the caller's dict is left as it was


def test_an_override_of_an_old_evaluation_field_names_the_new_one(capsys):
    with pytest.raises(ValueError, match=r"unknown config field 'train\.eval_every' .*; it is now 'eval\.every'"):
        get_preset("JiT-Micro/8").replace(**{"train.eval_every": 5})
    from pixelrepa.cli.main import main

    assert main(["train", "--preset", "JiT-Micro/8", "--set", "train.eval_align_images=5", "--dry-run"]) == 2
    assert "it is now 'eval.align_images'" in capsys.readouterr().err
