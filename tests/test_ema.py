"""Two EMAs of the backbone (SPEC 6): decays, warm-up, swap-in, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pixelrepa.config import EMAConfig
from pixelrepa.training.ema import BackboneEMA


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("table", torch.arange(5, dtype=torch.float32))


def set_params(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_default_decays():
    assert EMAConfig().decays == (0.9999, 0.9996)
    assert EMAConfig().warmup is False


def test_each_shadow_uses_its_own_decay():
    model = Small()
    config = EMAConfig(decays=(0.9999, 0.9996))
    set_params(model, 0.0)  # p0
    ema = BackboneEMA(model, config)
    set_params(model, 1.0)  # p1
    ema.update(model)
    for k, d in enumerate(config.decays):
        for name, value in ema.state_dict(k).items():
            expected = d * 0.0 + (1 - d) * 1.0
            torch.testing.assert_close(value, torch.full_like(value, expected), rtol=1e-4, atol=0, msg=name)
    # Non-trivial p0 and p1, two updates.
    torch.manual_seed(0)
    model = Small()
    p0 = [p.detach().clone() for p in model.parameters()]
    ema = BackboneEMA(model, EMAConfig(decays=(0.9, 0.5)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    p1 = [p.detach().clone() for p in model.parameters()]
    ema.update(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0)
    p2 = [p.detach().clone() for p in model.parameters()]
    ema.update(model)
    for k, d in enumerate((0.9, 0.5)):
        for a, b, c, (name, s) in zip(p0, p1, p2, ema.state_dict(k).items()):
            torch.testing.assert_close(s, d * (d * a + (1 - d) * b) + (1 - d) * c, msg=name)


def test_shadows_are_copies_not_views():
    model = Small()
    ema = BackboneEMA(model, EMAConfig())
    before = {k: v.clone() for k, v in ema.state_dict(0).items()}
    set_params(model, 7.0)
    for k, v in ema.state_dict(0).items():
        assert torch.equal(v, before[k])


def test_warmup_formula():
    model = Small()
    config = EMAConfig(decays=(0.9999, 0.9996), warmup=True)
    ema = BackboneEMA(model, config)
    for step in range(30):
        for k, d in enumerate(config.decays):
            assert ema.decay(k) == pytest.approx(min(d, (1 + step) / (10 + step)), rel=1e-12)
        ema.update(model)
    ema.step = 10**6
    assert ema.decay(0) == 0.9999 and ema.decay(1) == 0.9996
    # The first warm-up update uses decay 1/10: shadow = 0.1 * p0 + 0.9 * p1.
    set_params(model, 0.0)
    ema = BackboneEMA(model, config)
    set_params(model, 1.0)
    ema.update(model)
    for k in range(2):
        for v in ema.state_dict(k).values():
            torch.testing.assert_close(v, torch.full_like(v, 0.9))
    # Without warm-up the decay is constant.
    plain = BackboneEMA(model, EMAConfig(decays=(0.99,)))
    assert plain.decay(0) == 0.99
    plain.update(model)
    assert plain.decay(0) == 0.99


def test_swapped_in_uses_ema_and_restores_live_weights():
    torch.manual_seed(0)
    model = Small()
    ema = BackboneEMA(model, EMAConfig(decays=(0.9, 0.5)))
    set_params(model, 2.0)
    ema.update(model)  # shadow 0 = 0.9 p0 + 0.2, shadow 1 = 0.5 p0 + 1.0
    live = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = [id(p) for p in model.parameters()]
    with torch.no_grad():
        model.table.mul_(3)  # a buffer change made by the user
    table = model.table.clone()
    for k in range(2):
        with ema.swapped_in(model, k) as swapped:
            assert swapped is model
            for (name, p), s in zip(model.named_parameters(), ema.state_dict(k).values()):
                assert torch.equal(p, s), name
            assert torch.equal(model.table, table)  # buffers untouched
        for name, p in model.named_parameters():
            assert torch.equal(p, live[name]), name
        assert torch.equal(model.table, table)
    assert [id(p) for p in model.parameters()] == params_before  # same Parameter objects
    # Index 0 is the default.
    with ema.swapped_in(model):
        assert torch.equal(model.scale, ema.state_dict(0)["scale"])


def test_swapped_in_restores_on_exception():
    model = Small()
    ema = BackboneEMA(model, EMAConfig(decays=(0.5,)))
    set_params(model, 4.0)
    ema.update(model)
    live = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(model, 0):
            assert not torch.equal(model.scale, live["scale"])
            raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name]), name


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = Small()
    ema = BackboneEMA(model, EMAConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k in range(2):
        state = ema.state_dict(k)
        assert list(state) == [name for name, _ in model.named_parameters()]
        assert "table" not in state
    saved = [{k: v.clone() for k, v in ema.state_dict(i).items()} for i in range(2)]
    other = BackboneEMA(Small(), EMAConfig())
    for i in range(2):
        other.load_state_dict(i, ema.state_dict(i))
        for name, v in other.state_dict(i).items():
            assert torch.equal(v, saved[i][name]), name
    # The loaded copy is independent of the source.
    set_params(model, 9.0)
    ema.update(model)
    for name, v in other.state_dict(0).items():
        assert torch.equal(v, saved[0][name]), name
    # Missing keys are reported.
    partial = dict(saved[0])
    partial.pop("scale")
    with pytest.raises(KeyError, match="scale"):
        other.load_state_dict(0, partial)
