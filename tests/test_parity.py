"""Parity with the authors' released code (SPEC 9).

Reads the fixture folder from PIXELREPA_PARITY_FIXTURES (default
../shared/fixtures/official-small next to the repository) and every size and setting
from its config.json, so any folder with the same layout is checked the same way.
Tolerance: relative L2 error below 1e-5 per tensor, float32 on CPU.

Parity never vanishes silently: without the fixtures every test here fails, unless
PIXELREPA_SKIP_PARITY=1 says explicitly that this run does without them (CI never sets it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pixelrepa.align.heads import MaskedTransformerAdapter, apply_token_mask
from pixelrepa.config import SamplerConfig
from pixelrepa.interop.released import (
    config_from_args,
    config_from_constructor_kwargs,
    convert_state_dict,
    import_released,
    read_released_checkpoint,
    released_key_to_ours,
)
from pixelrepa.models.jit import JiT
from pixelrepa.objective import Draws, training_loss
from pixelrepa.sampling import guidance_scale, sample

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PIXELREPA_PARITY_FIXTURES", REPO.parent / "shared" / "fixtures" / "official-small"))
TOLERANCE = 1e-5
SKIP_VARIABLE = "PIXELREPA_SKIP_PARITY"
FIXTURES_FOUND = (FIXTURES / "config.json").is_file()

pytestmark = pytest.mark.skipif(not FIXTURES_FOUND and os.environ.get(SKIP_VARIABLE) == "1",
                                reason=f"no parity fixtures at {FIXTURES} and {SKIP_VARIABLE}=1")


@pytest.fixture(scope="module", autouse=True)
def fixtures_found():
    if not FIXTURES_FOUND:
        pytest.fail(f"no parity fixtures at {FIXTURES} (no config.json): point PIXELREPA_PARITY_FIXTURES at a "
                    f"fixture folder (../shared/fixtures/official-small beside the repository), or set "
                    f"{SKIP_VARIABLE}=1 to run without parity on purpose", pytrace=False)


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.detach().double() - ref.double()).norm() / ref.double().norm()).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = rel_error(ours, ref)
    assert err < TOLERANCE, f"{what}: relative error {err:.3e} >= {TOLERANCE}"


def load(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fixture_config() -> dict:
    return json.loads((FIXTURES / "config.json").read_text())


@pytest.fixture(scope="module")
def run_config(fixture_config):
    constants = {k: fixture_config[k] for k in
                 ("P_mean", "P_std", "t_eps", "noise_scale", "mask_ratio", "align_weight")}
    return config_from_constructor_kwargs(fixture_config["net"], fixture_config["adapter"], **constants)


@pytest.fixture(scope="module")
def networks(run_config):
    weights = load("weights.pt")
    net = JiT(run_config.model)
    net.load_state_dict(convert_state_dict(weights["net"]))
    adapter = MaskedTransformerAdapter(run_config.model, run_config.align)
    adapter.load_state_dict(convert_state_dict(weights["adapter"]))
    return net.eval(), adapter.eval()


@pytest.fixture(autouse=True)
def two_threads():
    """The fixtures were computed with 2 threads; match it (it moves results by ~1 ulp)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_config_matches_fixture_derived_values(fixture_config, run_config):
    model = run_config.model
    assert model.num_patches == fixture_config["num_patches"]
    assert model.hidden_size // model.num_heads == fixture_config["head_dim"]
    assert int(int(model.hidden_size * model.mlp_ratio) * 2 / 3) == fixture_config["swiglu_hidden"]


def test_fixed_tables(networks):
    net, adapter = networks
    weights = load("weights.pt")
    assert torch.equal(net.pos_embed, weights["net"]["pos_embed"])
    rope = load("rope.pt")
    for ours, key in ((net.rope_cos, "net.feat_rope.cos"), (net.rope_sin, "net.feat_rope.sin"),
                      (net.rope_cos_ctx, "net.feat_rope_incontext.cos"),
                      (net.rope_sin_ctx, "net.feat_rope_incontext.sin"),
                      (adapter.rope_cos, "adapter.feat_rope_incontext.cos"),
                      (adapter.rope_sin, "adapter.feat_rope_incontext.sin")):
        assert_close(ours, rope[key], key)


def test_forward_and_tapped_tokens(networks, run_config):
    net, _ = networks
    case = load("forward.pt")
    with torch.no_grad():
        assert_close(net(case["z"], case["t"], case["y"]), case["x_pred"], "x_pred")
        x_pred, tapped = net(case["z"], case["t"], case["y"], tap=run_config.tap_block)
        assert_close(tapped, case["enc_tokens"], "tapped tokens")
        assert_close(x_pred, case["x_pred"], "x_pred with tap")


def test_adapter(networks):
    net, adapter = networks
    case = load("adapter.pt")
    with torch.no_grad():
        adapter_in = apply_token_mask(case["tokens"], case["keep"], net.mask_token)
        assert torch.equal(adapter_in, case["adapter_in"])
        assert_close(adapter(case["adapter_in"], case["t"], case["y"]), case["out"], "adapter out")


def test_losses_and_gradients(networks, run_config, fixture_config):
    net, adapter = networks
    net.zero_grad()
    adapter.zero_grad()
    case = load("loss.pt")
    draws = Draws(t=case["t"], noise=case["e"], labels=case["labels_dropped"], keep=case["keep"])
    losses = training_loss(net, adapter, case["x"], draws, run_config.objective, run_config.align,
                           run_config.tap_block, target=case["target"])
    assert_close(losses["denoise"], case["loss_jit"], "loss_jit")
    assert_close(losses["align"], case["loss_align"], "loss_align")
    assert_close(losses["total"], case["total"], "total")
    losses["total"].backward()
    params = {"net": dict(net.named_parameters()), "adapter": dict(adapter.named_parameters())}
    assert set(case["grads"]) == set(fixture_config["grad_params"])
    for name, ref in case["grads"].items():
        group, key = name.split(".", 1)
        grad = params[group][released_key_to_ours(key)].grad
        assert grad is not None, f"no gradient reached {name}"
        assert_close(grad, ref, f"grad {name}")


@pytest.mark.parametrize("skip_unguided", [True, False], ids=["skip-unguided", "both-passes-everywhere"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched-guidance", "separate-passes"])
def test_sampler_cases(networks, run_config, fixture_config, batched, skip_unguided):
    """Every sampler case, with every saving on or off; both passes everywhere and separate
    calls is what the released sampler does."""
    net, _ = networks
    data = load("sample.pt")
    null_class = run_config.model.num_classes
    assert len(data["cases"]) == len(fixture_config["sample_cases"])
    for i, case in enumerate(data["cases"]):
        sampler = SamplerConfig(method=case["method"], steps=case["steps"], cfg_scale=case["cfg"],
                                interval_min=case["interval_min"], interval_max=case["interval_max"],
                                batched_guidance=batched, skip_unguided=skip_unguided)
        out, trajectory = sample(net, data["z0"], data["labels"], null_class, sampler,
                                 run_config.objective.t_eps, return_trajectory=True)
        assert len(trajectory) == case["steps"] + 1
        for k, (ours, ref) in enumerate(zip(trajectory, case["trajectory"])):
            assert_close(ours, ref, f"case {i} ({case['method']}) state after step {k}")
        assert_close(out, case["out"], f"case {i} final sample")


@pytest.mark.parametrize("skip_unguided", [True, False])
def test_sampler_network_evaluations(networks, run_config, skip_unguided):
    """nfe counts guided evaluations; an unguided one (scale 1) costs one pass, not two,
    unless skip_unguided is off (both passes at every evaluation, as released)."""
    net, _ = networks
    data = load("sample.pt")
    for case in data["cases"]:
        sampler = SamplerConfig(method=case["method"], steps=case["steps"], cfg_scale=case["cfg"],
                                interval_min=case["interval_min"], interval_max=case["interval_max"],
                                skip_unguided=skip_unguided)
        calls = []

        def counting_net(z, t, y):
            calls.append((z.shape[0], t[0].item(), bool((y == run_config.model.num_classes).all().item())))
            return net(z, t, y)

        sample(counting_net, data["z0"], data["labels"], run_config.model.num_classes, sampler,
               run_config.objective.t_eps)
        assert len(calls) == case["nfe"], "one network call per velocity evaluation"
        n = len(data["labels"])
        for images, t, _ in calls:
            both = guidance_scale(t, sampler) != 1.0 or not skip_unguided
            assert images == (2 * n if both else n), f"t={t}: both passes={both} but {images} images"
            assert t < 1.0, "the network is never evaluated at t = 1"
        if case["cfg"] == 1.0 and skip_unguided:
            assert all(images == n for images, _, _ in calls), "cfg 1 needs no unconditional pass"


# -- released checkpoint files ------------------------------------------------------

RELEASED = FIXTURES / "released"


@pytest.mark.parametrize("filename", ["pixelrepa_checkpoint-last.pth", "jit_checkpoint-last.pth"])
@pytest.mark.parametrize("weights", ["raw", "ema1", "ema2"])
def test_released_checkpoint_outputs(run_config, filename, weights):
    expected = torch.load(RELEASED / "expected.pt", weights_only=True)
    case = load("forward.pt")
    config, net, adapter = import_released(RELEASED / filename, run_config, weights=weights)
    with torch.no_grad():
        assert_close(net.eval()(case["z"], case["t"], case["y"]), expected[f"x_pred_{weights}"],
                     f"{filename} {weights} x_pred")
        if filename.startswith("pixelrepa"):
            assert adapter is not None
            a = load("adapter.pt")
            assert_close(adapter.eval()(a["adapter_in"], a["t"], a["y"]), expected["adapter_out"],
                         f"{filename} adapter")
        else:
            assert adapter is None and config.align.mode == "none"


def test_released_raw_equals_forward_fixture(run_config):
    expected = torch.load(RELEASED / "expected.pt", weights_only=True)
    assert torch.equal(expected["x_pred_raw"], load("forward.pt")["x_pred"])
    _, net, _ = import_released(RELEASED / "pixelrepa_checkpoint-last.pth", run_config, weights="raw")
    weights = load("weights.pt")["net"]
    ours = net.state_dict()
    for key, value in convert_state_dict(weights).items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("filename", ["pixelrepa_checkpoint-last.pth", "jit_checkpoint-last.pth"])
def test_released_args_that_do_not_fit_are_refused(filename):
    """The files' args name a preset that does not fit the small weights (fixture README):
    the import must stop at the first mismatching key and name both shapes."""
    checkpoint = read_released_checkpoint(RELEASED / filename)
    from_args = JiT(config_from_args(checkpoint.args).model).state_dict()
    first = next((key, value.shape) for key, value in convert_state_dict(checkpoint.backbone["ema1"]).items()
                 if key in from_args and from_args[key].shape != value.shape)
    with pytest.raises(ValueError) as info:
        import_released(RELEASED / filename, config=None, weights="ema1")
    message = str(info.value)
    assert f"'{first[0]}'" in message
    assert str(tuple(first[1])) in message and str(tuple(from_args[first[0]].shape)) in message


def test_jit_authors_checkpoint_without_mask_token(run_config, tmp_path, capsys):
    """A checkpoint from the JiT authors' code has no mask_token (SPEC 8): it is drawn as
    SPEC 3 initialises it, the same in all three weight sets, reproducibly, and reported;
    the outputs are the released ones. Any other missing or extra key is still refused."""
    from helpers import load_released

    from pixelrepa.cli.main import main
    from pixelrepa.interop.released import MASK_TOKEN_SEED

    def jit_authors_file(name: str, drop: tuple[str, ...] = (), add: dict | None = None):
        ckpt = load_released(RELEASED / "jit_checkpoint-last.pth")
        for part in ("model", "model_ema1", "model_ema2"):
            for key in ("mask_token", *drop):
                del ckpt[part][f"net.{key}"]
            ckpt[part].update(add or {})
        torch.save(ckpt, tmp_path / name)
        return tmp_path / name

    path = jit_authors_file("jit-authors.pth")
    expected = torch.load(RELEASED / "expected.pt", weights_only=True)
    case = load("forward.pt")
    width = run_config.model.hidden_size
    token = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(MASK_TOKEN_SEED)) * 0.02
    for weights in ("raw", "ema1", "ema2"):
        _, net, adapter = import_released(path, run_config, weights=weights)
        assert adapter is None
        assert torch.equal(net.mask_token.detach(), token), f"{weights}: mask token drawn as documented"
        with torch.no_grad():
            assert_close(net.eval()(case["z"], case["t"], case["y"]), expected[f"x_pred_{weights}"],
                         f"JiT authors' layout {weights} x_pred")

    out = tmp_path / "model.safetensors"
    assert main(["import", str(path), str(out), "--config", str(FIXTURES / "config.json")]) == 0
    printed = capsys.readouterr().out
    assert "no mask_token" in printed and "normal(0, 0.02)" in printed and f"seed {MASK_TOKEN_SEED}" in printed

    missing = jit_authors_file("missing.pth", drop=("blocks.0.attn.qkv.weight",))
    with pytest.raises(ValueError, match=r"lacks 'blocks\.0\.attn\.qkv\.weight'"):
        import_released(missing, run_config)
    extra = jit_authors_file("extra.pth", add={"net.extra_token": torch.zeros(1, 1, width)})
    with pytest.raises(ValueError, match="has 'extra_token'"):
        import_released(extra, run_config)
    assert main(["import", str(missing), str(tmp_path / "none.safetensors"), "--config",
                 str(FIXTURES / "config.json")]) == 2
    assert "'blocks.0.attn.qkv.weight'" in capsys.readouterr().err
    assert not (tmp_path / "none.safetensors").exists()
