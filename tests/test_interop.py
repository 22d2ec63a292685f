"""Released-checkpoint import and this project's model file, on synthetic checkpoints."""

from __future__ import annotations

import argparse
import collections

import pytest
import torch
from helpers import FIXTURES, load_released

from pixelrepa.config import RunConfig, get_preset
from pixelrepa.interop.released import (
    config_from_args,
    convert_state_dict,
    import_released,
    released_key_to_ours,
)
from pixelrepa.models.jit import JiT
from pixelrepa.weights import load_model_file, save_model_file


class NotAllowed:
    """A class a weights-only unpickler must refuse to construct."""

    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_key_mapping_examples():
    assert released_key_to_ours("blocks.3.adaLN_modulation.1.weight") == "blocks.3.ada.weight"
    assert released_key_to_ours("final_layer.adaLN_modulation.1.bias") == "final_layer.ada.bias"
    assert released_key_to_ours("final_layer.norm_final.weight") == "final_layer.norm.weight"
    assert released_key_to_ours("t_embedder.mlp.2.weight") == "t_embed.fc2.weight"
    assert released_key_to_ours("y_embedder.embedding_table.weight") == "y_embed.table.weight"
    assert released_key_to_ours("x_embedder.proj1.weight") == "patch_embed.proj1.weight"
    assert released_key_to_ours("in_context_posemb") == "in_context.pos"
    assert released_key_to_ours("projection_layer.mlp.3.weight") == "head.fc2.weight"
    assert released_key_to_ours("blocks.0.attn.q_norm.weight") == "blocks.0.attn.q_norm.weight"


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"net.x": torch.zeros(1)}, "args": NotAllowed()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        import_released(path, get_preset("JiT-Micro/8"))


def test_refuses_non_checkpoints(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="'model'"):
        import_released(path, get_preset("JiT-Micro/8"))
    with pytest.raises(FileNotFoundError):
        import_released(tmp_path / "missing.pth", get_preset("JiT-Micro/8"))


def _released_args(**overrides) -> argparse.Namespace:
    fields = dict(model="JiT-B/16", img_size=256, class_num=1000, attn_dropout=0.0, proj_dropout=0.0,
                  patch_mask_ratio=0.2, P_mean=-0.8, P_std=0.8, t_eps=0.05, noise_scale=1.0, label_drop_prob=0.1,
                  ema_decay1=0.9999, ema_decay2=0.9996, blr=5e-5, weight_decay=0.0, warmup_epochs=5, epochs=600,
                  repa_model="vit_base_patch14_dinov2.lvd142m", repa_image_size=256, repa_patch_size=16)
    fields.update(overrides)
    return argparse.Namespace(**fields)


def test_config_from_args_recovers_presets():
    pixelrepa = config_from_args(_released_args(mta="MTA-B/16"))
    assert pixelrepa.model == get_preset("PixelREPA-B/16").model
    assert pixelrepa.align.mode == "pixelrepa" and pixelrepa.align.mask_ratio == 0.2
    # The released H command sets only --proj_dropout 0.2 (SPEC 3).
    jit = config_from_args(_released_args(model="JiT-H/16", attn_dropout=0.0, proj_dropout=0.2))
    assert jit.align.mode == "none" and jit.model == get_preset("JiT-H/16").model


def test_round_trip_through_released_layout(tmp_path):
    """Write a synthetic released JiT checkpoint (EMA keys keep `net.`) with OrderedDicts
    and a Namespace, import each weight choice, compare with the source weights."""
    config = get_preset("JiT-Micro/8")
    sources = {}
    for choice, seed in (("raw", 0), ("ema1", 1), ("ema2", 2)):
        torch.manual_seed(seed)
        sources[choice] = JiT(config.model)
    inverse = {released_key_to_ours(k): k for k in _released_names(sources["raw"])}
    released = {choice: collections.OrderedDict((f"net.{inverse[k]}", v) for k, v in net.state_dict().items())
                for choice, net in sources.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": released["raw"], "model_ema1": released["ema1"], "model_ema2": released["ema2"],
                "epoch": 3, "args": _released_args(model="JiT-B/16", img_size=32, class_num=10)}, path)
    for choice, net in sources.items():
        _, imported, adapter = import_released(path, config, weights=choice)
        assert adapter is None
        for key, value in net.state_dict().items():
            assert torch.equal(imported.state_dict()[key], value), (choice, key)


def _released_names(net: JiT) -> list[str]:
    """The released names of our keys, by inverting the rules on a list of released names."""
    names = ["pos_embed", "in_context_posemb", "mask_token", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
             "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
             "x_embedder.proj1.weight", "x_embedder.proj2.weight", "x_embedder.proj2.bias",
             "final_layer.norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
             "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
    for i in range(net.config.depth):
        for part in ("norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight",
                     "attn.k_norm.weight", "attn.proj.weight", "attn.proj.bias", "mlp.w12.weight", "mlp.w12.bias",
                     "mlp.w3.weight", "mlp.w3.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"):
            names.append(f"blocks.{i}.{part}")
    assert sorted(released_key_to_ours(n) for n in names) == sorted(net.state_dict()), "mapping covers every key"
    return names


def test_model_file_round_trip(tmp_path):
    config = get_preset("PixelREPA-Micro/8")
    net = JiT(config.model)
    path = save_model_file(tmp_path / "m.safetensors", config, {"net": net.state_dict()}, {"weights": "ema1"})
    loaded_config, groups, metadata = load_model_file(path)
    assert loaded_config == config and isinstance(loaded_config, RunConfig)
    assert metadata["provenance.weights"] == "ema1"
    assert all(torch.equal(groups["net"][k], v) for k, v in net.state_dict().items())
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_model_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "none.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model_file(garbage)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a pixelrepa model file"):
        load_model_file(foreign)


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    config = get_preset("JiT-Micro/8")
    net = JiT(config.model)
    path = save_model_file(tmp_path / "m.safetensors", config, {"net": net.state_dict()})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pixelrepa.weights.save_file", crash)
    with pytest.raises(OSError):
        save_model_file(path, config, {"net": net.state_dict()})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_convert_state_dict_keeps_values():
    state = {"blocks.0.adaLN_modulation.1.weight": torch.ones(2)}
    assert torch.equal(convert_state_dict(state)["blocks.0.ada.weight"], torch.ones(2))


# -- released checkpoint files of the parity fixtures (SPEC 8, 9) ------------------------

needs_fixtures = pytest.mark.skipif(not (FIXTURES / "released").is_dir(), reason="parity fixtures not present")
RELEASED = FIXTURES / "released"


def _import(*argv: str) -> int:
    from pixelrepa.cli.main import main

    return main(["import", *map(str, argv)])


@needs_fixtures
def test_import_takes_the_sampler_settings_from_args(tmp_path, capsys):
    """The stored args' cfg, interval, steps and method become the model file's sampler;
    --set and the sampler flags of `import` and `sample` override them."""
    from pixelrepa.evaluation.sample_folder import load_for_sampling

    config_json = str(FIXTURES / "config.json")
    assert _import(RELEASED / "pixelrepa_checkpoint-last.pth", tmp_path / "as-stored.safetensors",
                   "--config", config_json) == 0
    assert "sampler settings from the checkpoint's args" in capsys.readouterr().out
    sampler = load_model_file(tmp_path / "as-stored.safetensors")[0].sampler
    assert (sampler.cfg_scale, sampler.interval_min, sampler.interval_max, sampler.steps, sampler.method) == \
        (1.0, 0.0, 1.0, 50, "heun")

    ckpt = load_released(RELEASED / "pixelrepa_checkpoint-last.pth")
    ckpt["args"].cfg, ckpt["args"].interval_min, ckpt["args"].interval_max = 2.5, 0.1, 0.9
    ckpt["args"].num_sampling_steps, ckpt["args"].sampling_method = 7, "euler"
    source = tmp_path / "modified.pth"
    torch.save(ckpt, source)
    assert _import(source, tmp_path / "taken.safetensors", "--config", config_json) == 0
    printed = capsys.readouterr().out
    assert "cfg_scale=2.5" in printed and "euler 7 steps, CFG 2.5 on (0.1, 0.9)" in printed
    sampler = load_model_file(tmp_path / "taken.safetensors")[0].sampler
    assert (sampler.cfg_scale, sampler.interval_min, sampler.interval_max, sampler.steps, sampler.method) == \
        (2.5, 0.1, 0.9, 7, "euler")

    assert _import(source, tmp_path / "overridden.safetensors", "--config", config_json, "--cfg", "3.0",
                   "--set", "sampler.steps=9") == 0
    assert "(overridden: cfg_scale, steps)" in capsys.readouterr().out
    model_file = tmp_path / "overridden.safetensors"
    sampler = load_model_file(model_file)[0].sampler
    assert (sampler.cfg_scale, sampler.steps, sampler.method, sampler.interval_min) == (3.0, 9, "euler", 0.1)
    sampler = load_for_sampling(model_file, {"steps": 4, "method": "heun"}, torch.device("cpu"))[0].sampler
    assert (sampler.cfg_scale, sampler.steps, sampler.method, sampler.interval_max) == (3.0, 4, "heun", 0.9)


@needs_fixtures
def test_import_without_a_config_applies_set_to_the_stored_args(tmp_path):
    """Without --preset/--config the args give the configuration and --set still applies."""
    fit = {"model.patch_size": 8, "model.hidden_size": 64, "model.depth": 4, "model.num_heads": 4,
           "model.bottleneck_dim": 16, "model.in_context_len": 4, "model.in_context_start": 1,
           "align.adapter_in_context_len": 4, "align.encoder.feature_dim": 48, "sampler.cfg_scale": 2.0}
    sets = [item for key, value in fit.items() for item in ("--set", f"{key}={value}")]
    out = tmp_path / "model.safetensors"
    assert _import(RELEASED / "pixelrepa_checkpoint-last.pth", out, *sets) == 0
    config = load_model_file(out)[0]
    assert config.model.hidden_size == 64 and config.sampler.cfg_scale == 2.0 and config.sampler.steps == 50


@needs_fixtures
def test_encoder_out_round_trips_the_stand_in_encoder(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    source = RELEASED / "pixelrepa_checkpoint-last.pth"
    encoder_file = tmp_path / "encoder.safetensors"
    assert _import(source, tmp_path / "model.safetensors", "--config", FIXTURES / "config.json",
                   "--encoder-out", encoder_file) == 0
    assert "--encoder-weights" in capsys.readouterr().out
    ckpt = load_released(source)
    stored = {k.removeprefix("repa_model."): v for k, v in ckpt["model"].items() if k.startswith("repa_model.")}
    written = load_file(str(encoder_file))
    assert set(written) == set(stored) and all(torch.equal(written[k], v) for k, v in stored.items())
    with safe_open(str(encoder_file), framework="pt") as f:
        metadata = f.metadata()
    args = ckpt["args"]
    assert (metadata["encoder.name"], metadata["encoder.img_size"], metadata["encoder.patch_size"]) == \
        (args.repa_model, str(args.repa_image_size), str(args.repa_patch_size))

    # A JiT checkpoint has no encoder: refused before anything is written; existing files are kept.
    jit = RELEASED / "jit_checkpoint-last.pth"
    assert _import(jit, tmp_path / "jit.safetensors", "--config", FIXTURES / "config.json",
                   "--encoder-out", tmp_path / "jit-encoder.safetensors") == 2
    assert "holds no encoder" in capsys.readouterr().err
    assert not (tmp_path / "jit.safetensors").exists() and not (tmp_path / "jit-encoder.safetensors").exists()
    before = encoder_file.read_bytes()
    assert _import(source, tmp_path / "other.safetensors", "--config", FIXTURES / "config.json",
                   "--encoder-out", encoder_file) == 2
    assert f"{encoder_file} exists" in capsys.readouterr().err and encoder_file.read_bytes() == before


@needs_fixtures
def test_encoder_out_gives_the_identical_encoder(tmp_path):
    """A DINOv2 of the real layout (random init, 256 px, patch 16) under `repa_model.` comes
    back through `--encoder-out` and `align.encoder.weights` as the same function; a config
    that builds it differently is refused with the settings to use."""
    import dataclasses

    import timm

    from pixelrepa.align.encoders import build_encoder
    from pixelrepa.config import EncoderConfig

    name = "vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, img_size=256, patch_size=16, num_classes=0).eval()
    ckpt = load_released(RELEASED / "pixelrepa_checkpoint-last.pth")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("repa_model.")}
    ckpt["model"].update({f"repa_model.{k}": v for k, v in original.state_dict().items()})
    ckpt["args"].repa_model = name
    source = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, source)
    encoder_file = tmp_path / "dinov2-s.safetensors"
    assert _import(source, tmp_path / "model.safetensors", "--config", FIXTURES / "config.json",
                   "--encoder-out", encoder_file) == 0

    cfg = EncoderConfig(name=name, img_size=256, patch_size=16, feature_dim=384, weights=str(encoder_file))
    encoder = build_encoder(cfg)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        normalised = ((x + 1) / 2 - encoder.mean) / encoder.std
        torch.testing.assert_close(encoder.model.forward_features(normalised), original.forward_features(normalised),
                                   rtol=0, atol=0)
        tokens = original.forward_features(normalised)[:, original.num_prefix_tokens:]
        torch.testing.assert_close(encoder(x, (16, 16)), tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="align.encoder.img_size=256"):
        build_encoder(dataclasses.replace(cfg, img_size=224, patch_size=14))
