"""`pixelrepa export RUN OUT --diffusers`: a diffusers pipeline that loads offline with its own code and
samples what `pixelrepa sample` samples from the same noise."""

from __future__ import annotations

import ast
import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import save_run

from pixelrepa.cli.main import main
from pixelrepa.config import SamplerConfig
from pixelrepa.interop.diffusers_export import CODE
from pixelrepa.loading import load_backbone_state, load_model
from pixelrepa.rng import image_generator
from pixelrepa.sampling import class_layout, generate, image_noise, sample, time_grid
from pixelrepa.weights import save_model_file

diffusers = pytest.importorskip("diffusers")

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PR_CONFIG = {"sample_size", "patch_size", "in_channels", "hidden_size", "num_layers", "num_attention_heads",
             "mlp_ratio", "attention_dropout", "dropout", "num_classes", "bottleneck_dim", "in_context_len",
             "in_context_start", "norm_eps"}
"""The configuration fields of diffusers' JiTTransformer2DModel (diffusers pull request 13098)."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    run = save_run(root / "run", "PixelREPA-Micro/8")
    (run / "classes.json").write_text(json.dumps(CLASSES))
    out = root / "pipeline"
    assert main(["export", str(run), str(out), "--diffusers"]) == 0
    return run, out


@pytest.fixture(scope="module")
def loaded(exported):
    return load_model(exported[0])


@pytest.fixture(scope="module")
def pipe(exported):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        pipeline = diffusers.DiffusionPipeline.from_pretrained(exported[1], trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_folder_has_diffusers_names_and_code_that_needs_no_pixelrepa(exported, pipe):
    out = exported[1]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_jit", "JiTPipeline"]
    assert index["id2label"] == {str(k): name for k, name in enumerate(CLASSES)}
    assert pipe.get_label_ids(["three", "seven"]) == [3, 7]
    config = {k for k in json.loads((out / "transformer" / "config.json").read_text()) if not k.startswith("_")}
    assert config == PR_CONFIG
    names = set(pipe.transformer.state_dict())
    assert {"pos_embed", "in_context_posemb", "x_embedder.proj1.weight", "x_embedder.proj2.bias",
            "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.to_q.weight", "blocks.0.attn.to_k.bias",
            "blocks.0.attn.to_v.weight", "blocks.0.attn.norm_q.weight", "blocks.0.attn.norm_k.weight",
            "blocks.0.attn.to_out.0.weight", "blocks.0.mlp.w12.weight", "blocks.0.mlp.w3.bias",
            "blocks.0.adaLN_modulation.weight", "norm_final.weight", "linear_final.weight",
            "adaLN_modulation_final.bias"} <= names
    assert not any("mask_token" in name or "qkv" in name for name in names)
    for code in sorted(CODE.glob("*.py")):
        tree = ast.parse(code.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported <= {"math", "dataclasses", "torch", "diffusers", "PIL"}, code.name


@pytest.mark.parametrize("method, steps, cfg, interval", [
    ("heun", 4, 1.0, (0.0, 1.0)),   # no guidance
    ("heun", 4, 3.0, (0.3, 0.8)),   # guidance on an interval
    ("euler", 3, 2.0, (0.0, 1.0)),  # guidance everywhere
])
def test_pipeline_samples_what_pixelrepa_samples_from_the_same_noise(loaded, pipe, method, steps, cfg, interval):
    config, net, _ = loaded
    sampler = dataclasses.replace(config.sampler, method=method, steps=steps, cfg_scale=cfg,
                                  interval_min=interval[0], interval_max=interval[1])
    classes, seed = [2, 7, 10 - 1], 5
    noise = torch.stack([image_noise(config, seed, k) for k in range(len(classes))])
    ours = sample(net, noise, torch.tensor(classes), config.model.num_classes, sampler, config.objective.t_eps)
    theirs = pipe(class_labels=classes, num_inference_steps=steps, guidance_scale=cfg, guidance_interval=interval,
                  method=method, generator=[image_generator(seed, k) for k in range(len(classes))],
                  output_type="pt").images
    torch.testing.assert_close(theirs, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=2e-5)


def test_pil_images_are_the_sample_commands_pixels_with_the_runs_settings(loaded, pipe):
    config, net, _ = loaded
    config = config.replace(**{"sampler.steps": 3})
    layout = class_layout(config.model.num_classes, [4, 1], 1)
    (_, ours), = generate(net, config, range(2), layout, 2, torch.device("cpu"), seed=0)
    images = pipe(class_labels=[4, 1], num_inference_steps=3, generator=[image_generator(0, k) for k in range(2)]).images
    theirs = np.stack([np.asarray(image) for image in images])
    difference = np.abs(theirs.astype(int) - ours.permute(0, 2, 3, 1).numpy().astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99
    assert pipe.config.guidance_scale == config.sampler.cfg_scale
    assert list(pipe.config.guidance_interval) == [config.sampler.interval_min, config.sampler.interval_max]


def test_export_without_diffusers_says_how_to_install_it(exported, tmp_path, monkeypatch, capsys):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert main(["export", str(exported[0]), str(tmp_path / "pipeline"), "--diffusers"]) != 0
    assert "pip install 'pixelrepa[diffusers]'" in capsys.readouterr().err
    assert not (tmp_path / "pipeline").exists()


def test_a_bfloat16_pipeline_samples_what_the_float32_one_does(exported, pipe):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        half = diffusers.DiffusionPipeline.from_pretrained(exported[1], trust_remote_code=True,
                                                           dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.transformer.dtype == torch.bfloat16
    call = dict(class_labels=[3, 8], num_inference_steps=2, output_type="pt")
    theirs = half(generator=torch.manual_seed(0), **call).images
    ours = pipe(generator=torch.manual_seed(0), **call).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0.05)


def test_a_failed_export_writes_nothing_and_names_the_file(tmp_path, capsys):
    run = save_run(tmp_path / "run", "JiT-Micro/8")
    (run / "classes.json").write_text('["zero", "one"')
    assert main(["export", str(run), str(tmp_path / "pipeline"), "--diffusers"]) == 2
    assert f"{run / 'classes.json'} is not a JSON list of class names" in capsys.readouterr().err
    assert not (tmp_path / "pipeline").exists()


def pipeline_and_ours(loaded, pipe, sampler, classes, seed=5, **call):
    """The pipeline's images (output_type 'pt') and pixelrepa's sampler's from the same noise, in [0, 1]."""
    config, net, _ = loaded
    noise = torch.stack([image_noise(config, seed, k) for k in range(len(classes))])
    ours = sample(net, noise, torch.tensor(classes), config.model.num_classes, sampler, config.objective.t_eps)
    theirs = pipe(class_labels=classes, generator=[image_generator(seed, k) for k in range(len(classes))],
                  output_type="pt", **call).images
    return theirs, (ours / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("method, steps, schedule, cfg, interval", [
    ("dpm2m", 4, "uniform", 3.0, (0.3, 0.8)),  # the history restarts entering and leaving the interval
    ("dpm3m", 5, "uniform", 3.0, (0.1, 1.0)),  # third order once inside the interval
    ("dpm2m", 4, "shifted", 2.0, (0.1, 1.0)),
    ("dpm2m", 4, "edm", 2.0, (0.1, 1.0)),
])
def test_multistep_solvers_and_grids_sample_what_pixelrepa_samples(loaded, pipe, method, steps, schedule, cfg,
                                                                   interval):
    sampler = dataclasses.replace(loaded[0].sampler, method=method, steps=steps, schedule=schedule, cfg_scale=cfg,
                                  interval_min=interval[0], interval_max=interval[1])
    theirs, ours = pipeline_and_ours(loaded, pipe, sampler, [2, 7], num_inference_steps=steps, method=method,
                                     schedule=schedule, guidance_scale=cfg, guidance_interval=interval)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)


def test_the_runs_solver_and_grid_are_the_pipelines_defaults(loaded, tmp_path):
    config, _, _ = loaded
    config = config.replace(**{"sampler.method": "dpm3m", "sampler.multistep_in": "log_snr", "sampler.steps": 5,
                               "sampler.schedule": "shifted", "sampler.shift": 0.5, "sampler.cfg_scale": 2.0,
                               "sampler.interval_min": 0.0})
    model = save_model_file(tmp_path / "model.safetensors", config, {"net": loaded[1].state_dict()})
    assert main(["export", str(model), str(tmp_path / "pipeline"), "--diffusers"]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        pipeline = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    pipeline.set_progress_bar_config(disable=True)
    s = config.sampler
    assert {k: pipeline.scheduler.config[k] for k in ("method", "multistep_in", "schedule", "shift")} == \
        {"method": s.method, "multistep_in": s.multistep_in, "schedule": s.schedule, "shift": s.shift}
    theirs, ours = pipeline_and_ours(loaded, pipeline, s, [4, 1])
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-5)


@pytest.mark.parametrize("schedule, settings", [
    ("uniform", {}), ("shifted", {"shift": 0.5}), ("shifted", {"shift": 3.0}),
    ("edm", {"rho": 5.0, "sigma_min": 0.01, "sigma_max": 20.0}),
])
def test_the_schedulers_time_grids_are_pixelrepas_float32_times(pipe, schedule, settings):
    for steps in (1, 2, 7, 50):
        scheduler = type(pipe.scheduler)(method="dpm2m", schedule=schedule, **settings)
        scheduler.set_timesteps(steps)
        assert scheduler.grid == time_grid(SamplerConfig(steps=steps, schedule=schedule, **settings))
        assert scheduler.timesteps.tolist() == scheduler.grid[:-1]
    if schedule == "uniform":
        assert scheduler.grid == torch.linspace(0, 1, 51).tolist()


@pytest.mark.parametrize("keyword, value, choices", [
    ("method", "dpm4m", "heun | euler | dpm2m | dpm3m"), ("schedule", "karras", "uniform | shifted | edm"),
])
def test_an_unknown_method_or_schedule_is_a_one_line_error(pipe, keyword, value, choices):
    with pytest.raises(ValueError) as err:
        pipe(class_labels=[1], **{keyword: value})
    assert str(err.value) == f"unknown {keyword} '{value}' ({choices})"


def test_a_sampler_that_cannot_sample_is_refused(exported, tmp_path, capsys):
    config, state, _ = load_backbone_state(exported[0])
    bad = config.replace(**{"sampler.schedule": "shifted", "sampler.shift": 1e-6, "sampler.steps": 500})
    model = save_model_file(tmp_path / "model.safetensors", bad, {"net": state})
    assert main(["export", str(model), str(tmp_path / "pipeline"), "--diffusers"]) == 2
    err = capsys.readouterr().err
    assert "cannot be the pipeline's defaults" in err and "the 'shifted' grid of 500 steps has repeated times" in err
    assert not (tmp_path / "pipeline").exists()


def test_the_readme_loads_the_repository_it_is_pushed_to(exported, tmp_path):
    from pixelrepa.interop.diffusers_export import export_diffusers

    assert 'from_pretrained("THIS_FOLDER"' in (exported[1] / "README.md").read_text()
    out = export_diffusers(exported[0], tmp_path / "pushed", repo_id="someone/jit-pipeline")
    assert 'from_pretrained("someone/jit-pipeline", trust_remote_code=True)' in (out / "README.md").read_text()


def test_a_step_out_of_order_is_refused_naming_the_time_it_expected(pipe):
    scheduler = type(pipe.scheduler)(method="heun")
    scheduler.set_timesteps(3)
    z, v = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    for t in scheduler.timesteps[:2]:
        z = scheduler.step(v, t, z).prev_sample
    with pytest.raises(ValueError, match=r"t = 0.666667, but the next evaluation is at t = 0.333333"):
        scheduler.step(v, scheduler.timesteps[4], z)
    for t in scheduler.timesteps[2:]:
        z = scheduler.step(v, t, z).prev_sample
    torch.testing.assert_close(z, torch.ones_like(z))
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(v, scheduler.timesteps[-1], z)


@pytest.mark.parametrize("labels", [[3, 10], [-1], []])
def test_a_class_label_outside_the_classes_is_refused(pipe, labels):
    with pytest.raises(ValueError, match=r"class_labels must be class ids in 0\.\.9 \(id 10 is the unconditional"):
        pipe(class_labels=labels, num_inference_steps=1)
