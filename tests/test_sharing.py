"""Sharing a trained model: the Hugging Face Hub folder (`export --hub`, Hub ids through the cache,
`--push`) and the released checkpoint-last.pth layout (`export --released`, back with `import`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from helpers import FIXTURES, STEP, load_released, save_run

from pixelrepa import checkpoint as ckpt
from pixelrepa.cli.main import main
from pixelrepa.config import RunConfig, get_preset
from pixelrepa.interop.released import NET, read_released_checkpoint
from pixelrepa.loading import load_backbone_state, load_head, load_model
from pixelrepa.weights import load_model_file

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("pixelrepa") / "run", "PixelREPA-Micro/8")


def outputs(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 3, 32, 32, generator=g)
    return net(z, torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 10]))


# -- the released layout -------------------------------------------------------------------------

def test_released_export_has_the_released_keys_and_imports_back_identically(run, tmp_path):
    out = tmp_path / "checkpoint-last.pth"
    assert main(["export", str(run), str(out), "--released"]) == 0
    written, fixture = load_released(out), load_released(FIXTURES / "released" / "pixelrepa_checkpoint-last.pth")
    assert set(written) == {"model", "model_ema1", "model_ema2", "optimizer", "epoch", "args"}
    assert written["epoch"] == 2  # 3 epochs done: the released --resume continues at epoch 3
    # The fixture's small architecture is PixelREPA-Micro/8's: the same names, the encoder's aside.
    assert sorted(k for k in written["model"] if not k.startswith("repa_model.")) == \
        sorted(k for k in fixture["model"] if not k.startswith("repa_model."))
    assert sorted(written["model_ema1"]) == sorted(fixture["model_ema1"])
    assert set(vars(written["args"])) == set(vars(fixture["args"]))
    assert (written["args"].model, written["args"].mta) == ("JiT-Micro/8", "MTA-Micro/8")
    assert any(k.startswith("repa_model.") for k in written["model"])

    folder = ckpt.find_checkpoint(run)
    model = ckpt.read_state(folder, ("model",))["model"]
    for ema in ("2", "raw"):
        imported = tmp_path / f"imported-{ema}.safetensors"
        assert main(["import", str(out), str(imported), "--ema", ema]) == 0
        config, groups, _ = load_model_file(imported)
        expected = load_backbone_state(run, "raw" if ema == "raw" else int(ema))[1]
        assert groups["net"].keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(groups["net"][key], value), (ema, key)
        head = {k[len("head."):]: v for k, v in model.items() if k.startswith("head.")}
        assert all(torch.equal(groups["adapter"][k], v) for k, v in head.items()) and groups["adapter"].keys() == head.keys()
        assert config.model == get_preset("PixelREPA-Micro/8").model and config.align.mode == "pixelrepa"


def test_released_export_carries_the_adamw_moments_in_the_released_numbering(tmp_path):
    from pixelrepa.interop.init_from import released_optimizer_state
    from pixelrepa.interop.released import released_parameter_order
    from pixelrepa.training.module import TrainingModule
    from pixelrepa.training.optim import make_optimizer

    run = save_run(tmp_path / "run", "PixelREPA-Micro/8", optimizer_steps=2)
    out = tmp_path / "checkpoint-last.pth"
    assert main(["export", str(run), str(out), "--released"]) == 0
    written = load_released(out)
    fixture = read_released_checkpoint(FIXTURES / "released" / "pixelrepa_checkpoint-last.pth")
    order = [name for name, _ in fixture.trainable]  # the released module's own parameter order
    assert released_parameter_order(sorted(order)) == order
    config = load_model(run)[0]
    exempt = [n for n in order if written["model"][n].ndim == 1 or n.endswith(".bias")]
    groups = written["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, config.optim.weight_decay]
    assert [len(g["params"]) for g in groups] == [len(exempt), len(order) - len(exempt)]

    # The released script's optimizer (misc.add_weight_decay over the module's parameters) loads it.
    params = {n: torch.nn.Parameter(torch.zeros(written["model"][n].shape)) for n in order}
    released = torch.optim.AdamW([{"params": [params[n] for n in exempt], "weight_decay": 0.0},
                                  {"params": [params[n] for n in order if n not in exempt], "weight_decay": 0.05}],
                                 lr=1e-4, betas=(0.9, 0.95))
    released.load_state_dict(written["optimizer"])
    saved = ckpt.read_state(ckpt.find_checkpoint(run), ("optimizer",))["optimizer"]["state"]
    probe = "net.blocks.1.attn.qkv.weight"
    assert torch.equal(released.state[params[probe]]["exp_avg"], saved["net.blocks.1.attn.qkv.weight"]["exp_avg"])

    # Imported back (`--init-from --continue`'s path), every moment is the run's own.
    module = TrainingModule(config)
    state, line = released_optimizer_state(read_released_checkpoint(out), module, make_optimizer(module, config))
    assert state is not None, line
    assert state["state"].keys() == saved.keys()
    for name, moments in saved.items():
        for key, value in moments.items():
            assert torch.equal(state["state"][name][key], value), (name, key)


def test_a_run_without_alignment_gets_the_jit_layout(tmp_path):
    from pixelrepa.interop.released import released_parameter_order

    run = save_run(tmp_path / "run", "JiT-Micro/8", optimizer_steps=1)
    out = tmp_path / "checkpoint-last.pth"
    assert main(["export", str(run), str(out), "--released"]) == 0
    written = load_released(out)
    assert all(k.startswith(NET) for k in written["model"]) and all(k.startswith(NET) for k in written["model_ema1"])
    assert f"{NET}mask_token" not in written["model"]  # the JiT authors' model has none
    assert not hasattr(written["args"], "mta")
    released = read_released_checkpoint(out)
    assert released.layout == "jit" and released.epoch == 2
    fixture = [name for name, _ in read_released_checkpoint(FIXTURES / "released" / "jit_checkpoint-last.pth").trainable]
    assert released_parameter_order(sorted(fixture)) == fixture
    jit_authors = [name for name in fixture if name != f"{NET}mask_token"]  # the fixture carries one; LTH14/JiT has none
    assert [name for name, _ in released.trainable] == jit_authors  # their module's trainable parameters, in order
    assert sum(len(g["params"]) for g in written["optimizer"]["param_groups"]) == len(jit_authors)
    assert len(written["optimizer"]["state"]) == len(jit_authors)  # the mask token's moments are left out with it
    imported = tmp_path / "imported.safetensors"
    assert main(["import", str(out), str(imported), "--ema", "2"]) == 0
    state = load_model_file(imported)[1]["net"]
    expected = load_backbone_state(run, 2)[1]
    assert all(torch.equal(state[k], v) for k, v in expected.items() if k != "mask_token")


# -- the Hub folder --------------------------------------------------------------------------------

def test_hub_folder_loads_back_and_its_card_is_hub_metadata(run, tmp_path):
    (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
        {"step": 4, "eval": {"images": 100, "fid": 80.5, "seconds": 3.0}},
        {"step": 8, "eval": {"images": 100, "fid": 61.25, "kid_mean": 0.05, "kid_std": 0.01, "seconds": 3.0}},
        {"step": 16, "eval": {"images": 100, "fid": 40.0}},  # after the exported checkpoint: not its numbers
    ]))
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    reference, loaded = load_model(run), load_model(out)
    assert loaded.config == reference.config
    assert torch.equal(outputs(loaded.net), outputs(reference.net))
    assert RunConfig.from_dict(json.loads((out / "config.json").read_text())["config"]) == reference.config

    card = huggingface_hub.ModelCard.load(out / "README.md")
    metadata = huggingface_hub.metadata_load(out / "README.md")
    assert card.data.to_dict()["library_name"] == metadata["library_name"] == "pixelrepa"
    assert (metadata["preset"], metadata["dataset"], metadata["training_steps"]) == ("PixelREPA-Micro/8", "mnist", STEP)
    assert metadata["evaluation"]["step"] == 8 and metadata["evaluation"]["settings"]["images"] == 100
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"fid": 61.25, "kid_mean": 0.05}
    assert json.loads(card.data.eval_results[0].metric_config)["sampler"]["steps"] == reference.config.sampler.steps

    ema2 = tmp_path / "hub-ema2"
    assert main(["export", str(run), str(ema2), "--hub", "--ema", "2"]) == 0  # only EMA 1 is evaluated in training
    assert "evaluation" not in huggingface_hub.metadata_load(ema2 / "README.md")


def fake_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0123abcd") -> None:
    """What `huggingface_hub` leaves in its cache after downloading `repo_id`: blobs, a snapshot, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_hub_id_loads_offline_in_the_library_and_the_commands(run, tmp_path, offline_cache, monkeypatch):
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub"]) == 0
    fake_hub_cache(offline_cache, "someone/pixelrepa-micro", out)
    assert huggingface_hub.try_to_load_from_cache("someone/pixelrepa-micro", "model.safetensors") is not None

    monkeypatch.chdir(tmp_path)
    loaded = load_model("someone/pixelrepa-micro")
    assert loaded.source["path"].startswith(str(offline_cache))
    assert torch.equal(outputs(loaded.net), outputs(load_model(run).net))
    assert load_head("someone/pixelrepa-micro", loaded.config)[0] is None  # a sampling export: backbone only
    assert load_model("someone/pixelrepa-micro@main").source["path"] == loaded.source["path"]  # refs/main
    with pytest.raises(FileNotFoundError, match="someone/pixelrepa-micro@v2, and as a Hugging Face Hub id"):
        load_model("someone/pixelrepa-micro@v2")  # a revision that is not cached

    grid = tmp_path / "grid.png"
    assert main(["sample", "someone/pixelrepa-micro", str(grid), "--classes", "1", "--per-class", "1",
                 "--steps", "2"]) == 0
    assert grid.is_file()

    # A local path that exists wins over the Hub id of the same name.
    local = tmp_path / "someone" / "pixelrepa-micro"
    assert main(["export", str(run), str(local), "--hub", "--ema", "2"]) == 0
    assert load_model("someone/pixelrepa-micro").source["path"] == str((local / "model.safetensors").resolve())

    with pytest.raises(FileNotFoundError, match="Hugging Face Hub id"):
        load_model("someone/not-cached")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"no local path someone/other; .*pip install 'pixelrepa\[hub\]'"):
        load_model("someone/other")


def test_push_refuses_without_a_token_before_writing(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub", "--push", "someone/model"]) != 0
    assert "no Hugging Face token is configured" in capsys.readouterr().err
    assert not out.exists()


def test_push_refuses_offline_or_a_bad_repository_id_before_writing(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub", "--push", "someone/model@main"]) == 2
    assert "--push someone/model@main: not a Hub repository id" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["export", str(run), str(out), "--diffusers", "--push", "someone/model"]) == 2
    assert "--push someone/model: HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not out.exists()


def test_push_uploads_the_folder_through_huggingface_hub(run, tmp_path, monkeypatch, capsys):
    calls = []
    endpoint = "https://hub.example.org"  # HF_ENDPOINT: the URL printed is the one the Hub gives back

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw))
        return huggingface_hub.RepoUrl(f"{endpoint}/{repo_id}", endpoint=endpoint)

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["delete_patterns"],
                                                         sorted(p.name for p in Path(kw["folder_path"]).iterdir()))))
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub", "--push", "someone/model", "--private"]) == 0
    assert calls == [("create", "someone/model", {"private": True, "exist_ok": True}),
                     ("upload", "someone/model", "*", ["README.md", "config.json", "model.safetensors"])]
    assert f"to {endpoint}/someone/model" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "pixelrepa sample someone/model grid.png" in card and 'load_model("someone/model")' in card
    assert "ORG/NAME" not in card


def test_released_with_an_ema_is_refused_with_the_right_fix(run, tmp_path, capsys):
    for ema in ("raw", "1"):
        assert main(["export", str(run), str(tmp_path / "out.pth"), "--released", "--ema", ema]) == 2
        assert "--released writes the raw weights and both EMAs: leave --ema out" in capsys.readouterr().err


def test_a_failed_hub_export_writes_nothing_and_names_the_file(tmp_path, capsys):
    run = save_run(tmp_path / "run", "JiT-Micro/8")
    (run / "log.jsonl").write_text('{"step": 4, "eval": {"fid": 80.5}}\n{"step": 8, "ev\n{"step": 9}\n')
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub"]) == 2
    assert f"{run / 'log.jsonl'} line 2 is not JSON" in capsys.readouterr().err
    assert not out.exists()


def test_a_log_line_torn_by_a_killed_writer_is_left_out(tmp_path):
    run = save_run(tmp_path / "run", "JiT-Micro/8")
    (run / "log.jsonl").write_text('{"step": 4, "eval": {"fid": 80.5}}\n{"step": 8, "eval": {"fi')
    assert main(["export", str(run), str(tmp_path / "hub"), "--hub"]) == 0
    assert "80.5" in (tmp_path / "hub" / "README.md").read_text()


def test_force_replaces_an_earlier_export_whole_and_refuses_any_other_folder(run, tmp_path, capsys):
    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub"]) == 0
    (out / "stale.bin").write_bytes(b"from an older export")
    assert main(["export", str(run), str(out), "--hub"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--hub", "--force", "--ema", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    assert main(["export", str(run), str(mine), "--diffusers", "--force"]) == 2
    assert f"{mine} holds notes.txt, not an earlier export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "not an export"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", str(run), str(afile), "--hub", "--force"]) == 2
    assert "is not a folder" in capsys.readouterr().err and afile.read_text() == "x"


def test_an_export_that_fails_midway_leaves_the_earlier_folder_as_it_was(run, tmp_path, monkeypatch):
    from pixelrepa.interop import hub

    out = tmp_path / "hub"
    assert main(["export", str(run), str(out), "--hub"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_model_file", fail)
    with pytest.raises(OSError, match="disk full"):
        hub.export_hub(run, out, ema=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
