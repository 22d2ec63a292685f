"""The Hugging Face Hub layout of a model (`pixelrepa export RUN OUT --hub`) and its upload (`--push`).

The folder holds `model.safetensors` (this project's model file: the backbone and its full
configuration, what `load_model` reads), `config.json` (the same configuration as JSON, for readers
of the Hub page) and `README.md`, a model card whose YAML metadata names `library_name: pixelrepa`,
the preset, the data set, the training steps and, where the run evaluated EMA 1 during training
(`eval.every`), the last evaluation's numbers with their settings, also as a `model-index` the Hub
shows. `load_model(OUT)` and `load_model("org/name")` (through the Hub cache) load it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pixelrepa.config import RunConfig, matching_preset
from pixelrepa.files import read_jsonl, replace_folder_atomic
from pixelrepa.loading import MODEL_FILE_NAME, load_backbone_state, require_huggingface_hub
from pixelrepa.version import __version__
from pixelrepa.weights import FORMAT, save_model_file

LIBRARY_NAME = "pixelrepa"
EVAL_METRICS = {"fid": "FID", "kid_mean": "KID", "fd_encoder": "FD (encoder features)"}
"""Evaluation-record keys that become Hub `model-index` metrics, with their display names."""


def export_hub(source: str | Path, out: str | Path, ema: int | str | None = None, repo_id: str | None = None) -> Path:
    """Write the Hub folder of `source` (a run or checkpoint folder: EMA `ema`, default 1; or a model
    file) to `out` and return it; the model card's examples load `repo_id` (default a placeholder)."""
    hub = require_huggingface_hub()
    config, state, origin = load_backbone_state(source, ema)
    step = origin.get("step")
    evaluation = None
    if origin["kind"] == "training checkpoint" and origin["weights"] == "ema1":
        evaluation = run_evaluation(Path(origin["path"]).parent.parent, step, config)
    card = model_card(hub, config, step, origin, evaluation, repo_id)  # everything read before the first write
    provenance = {k: v for k, v in origin.items() if k in ("path", "weights", "step")} | origin.get("provenance", {})

    def write(folder: Path) -> None:
        save_model_file(folder / MODEL_FILE_NAME, config, {"net": state}, provenance)
        (folder / "config.json").write_text(json.dumps(
            {"library_name": LIBRARY_NAME, "format": FORMAT, "pixelrepa_version": __version__,
             "config": config.to_dict()}, indent=2) + "\n")
        (folder / "README.md").write_text(card)

    replace_folder_atomic(Path(out), write)
    return Path(out)


def run_evaluation(run_dir: Path, step: int | None, config: RunConfig) -> dict[str, Any] | None:
    """The run's last evaluation during training (`eval.every`, EMA 1) at or before `step`, from its
    `log.jsonl`, with its settings; None if it has none."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    records = [entry for entry in read_jsonl(log) if "eval" in entry and (step is None or entry["step"] <= step)]
    if not records:
        return None
    last = records[-1]
    metrics = {k: v for k, v in last["eval"].items() if k != "images" and not k.endswith("seconds")}
    ev = config.eval
    settings = {"weights": "EMA 1", "images": last["eval"].get("images", ev.images), "seed": ev.seed,
                "labels": "class-major, ceil(images / classes) per class",
                "inception_reference": Path(ev.ref).name if ev.ref else None,
                "encoder_reference": Path(ev.encoder_ref).name if ev.encoder_ref else None,
                "sampler": asdict(config.sampler)}
    return {"step": last["step"], "metrics": metrics, "settings": settings}


def model_card(hub, config: RunConfig, step: int | None, origin: dict, evaluation: dict | None,
               repo_id: str | None = None) -> str:
    """The README.md of a Hub folder: YAML metadata (`huggingface_hub.ModelCardData`) and a short text."""
    preset = matching_preset(config)
    dataset = _dataset_name(config.data.source)
    sampler = asdict(config.sampler)
    metadata: dict[str, Any] = {
        "preset": preset, "dataset": dataset, "training_steps": step,
        "training_images": None if step is None else step * config.optim.global_batch,
        "weights": origin.get("weights") or origin.get("provenance", {}).get("weights"),
        "alignment": config.align.mode, "resolution": config.model.input_size,
        "num_classes": config.model.num_classes, "sampler": sampler}
    eval_results = None
    if evaluation is not None:
        metadata["evaluation"] = evaluation
        eval_results = [hub.EvalResult(task_type="image-generation", dataset_type=dataset or "unknown",
                                       dataset_name=dataset or "unknown", metric_type=key,
                                       metric_name=EVAL_METRICS[key], metric_value=evaluation["metrics"][key],
                                       metric_config=json.dumps(evaluation["settings"], sort_keys=True))
                        for key in EVAL_METRICS if key in evaluation["metrics"]] or None
    name = f"{preset or 'JiT'} ({config.align.mode} alignment)"
    data = hub.ModelCardData(library_name=LIBRARY_NAME, tags=["pixelrepa", "jit", "pixel-space-diffusion",
                                                              "class-conditional-image-generation"],
                             model_name=name, eval_results=eval_results,
                             **{k: v for k, v in metadata.items() if v is not None})
    m = config.model
    lines = [f"# {name}", "",
             f"A JiT backbone ({m.depth} blocks, width {m.hidden_size}, patch {m.patch_size}, {m.input_size} px, "
             f"{m.num_classes} classes) trained with pixelrepa"
             + (f" for {step} steps" if step is not None else "")
             + (f" on {dataset}" if dataset else "") + f"; these are its {metadata['weights'] or 'trained'} weights.",
             "", "```bash", "pip install 'pixelrepa[hub]'",
             f"pixelrepa sample {repo_id or 'ORG/NAME'} grid.png --classes 0 1 2 --per-class 4", "```", "",
             "```python", "import pixelrepa", f'config, net, source = pixelrepa.load_model("{repo_id or "ORG/NAME"}")',
             "```", "",
             f"Sampler: {sampler['method']}, {sampler['steps']} steps, CFG {sampler['cfg_scale']} on t in "
             f"({sampler['interval_min']}, {sampler['interval_max']})."]
    if evaluation is not None:
        numbers = ", ".join(f"{EVAL_METRICS.get(k, k)} {v:.4g}" for k, v in evaluation["metrics"].items()
                            if isinstance(v, (int, float)))
        lines += ["", f"Evaluated during training at step {evaluation['step']} on "
                      f"{evaluation['settings']['images']} images of EMA 1: {numbers}."]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _dataset_name(source: str) -> str | None:
    """A short name of the training data: 'mnist', or the pack / folder name."""
    return Path(source).name or None if source else None


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub repository `repo_id` (created if missing) and return its URL.

    The commit makes the repository hold exactly the folder: files an earlier push left that this
    export does not have (a model file beside a newer diffusers layout) are deleted in the same
    commit (they stay in the repository's history). Refused before anything is sent when no token
    is configured (`require_token`)."""
    hub = require_token(repo_id)
    api = hub.HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)  # a RepoUrl on the configured endpoint
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, delete_patterns="*",
                      commit_message=f"pixelrepa {__version__} export")
    return str(url)


def require_token(repo_id: str):
    """The `huggingface_hub` module once `repo_id` is a valid repository id, the Hub is not switched
    off (`HF_HUB_OFFLINE`) and a token is configured; else a ValueError saying what to change (called
    before anything is written, so a refused push leaves nothing behind)."""
    hub = require_huggingface_hub()
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except hub.errors.HFValidationError as err:
        raise ValueError(f"--push {repo_id}: not a Hub repository id ({err}); give ORG/NAME, without "
                         "@revision") from None
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"--push {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it "
                         "(nothing was written or uploaded)")
    if hub.get_token() is None:
        raise ValueError(f"--push {repo_id}: no Hugging Face token is configured (run `hf auth login` or set "
                         "HF_TOKEN); nothing was written or uploaded")
    return hub
