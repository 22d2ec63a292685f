"""Start a training run from a released checkpoint (`pixelrepa train --init-from`, SPEC 6, 8).

The run's configuration is the user's; the released weights must fit it exactly. The
training module gets the raw backbone and, for PixelREPA, the adapter; the EMAs get
`model_ema1` / `model_ema2`; the optimizer gets the released AdamW state only where the
released parameter numbering provably maps onto this run's parameters by name.

The released optimizer numbers the trainable parameters of the released module in
`named_parameters()` order (`ReleasedCheckpoint.trainable`), group after group: one group,
or with `misc.add_weight_decay` two, [1-D parameters and `.bias`, the rest].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pixelrepa.interop.released import (
    ADAPTER,
    NET,
    ReleasedCheckpoint,
    check_exact,
    convert_state_dict,
    load_exact,
    released_key_to_ours,
)


@dataclass
class ReleasedStart:
    ema: list[dict[str, Tensor]]
    """One backbone state per EMA decay of the run, under our key names."""
    report: list[str]
    """What was taken, made up or left out, one line each."""


class _Unmappable(Exception):
    """The released optimizer state cannot be shown to fit; the message says why."""


def load_released_weights(ckpt: ReleasedCheckpoint, module: nn.Module) -> ReleasedStart:
    """Load the raw backbone (and the adapter, for a PixelREPA run) into a `TrainingModule`
    strictly, naming the first key that does not fit; return the EMA states to load."""
    config = module.config
    report = list(ckpt.notes)
    load_exact(module.net, convert_state_dict(ckpt.backbone["raw"]), "backbone (raw)")
    report.append(f"backbone: raw weights of {ckpt.path} (epoch {ckpt.epoch})")
    if config.align.mode == "pixelrepa" and ckpt.adapter is not None:
        load_exact(module.head, convert_state_dict(ckpt.adapter), "adapter")
        report.append("adapter: from the checkpoint")
    elif module.head is not None:
        report.append(f"{type(module.head).__name__}: not in the checkpoint, starts from its initialisation")
    elif ckpt.adapter is not None:
        report.append("adapter: in the checkpoint but not used (alignment none)")
    decays = config.ema.decays
    available = [choice for choice in ("ema1", "ema2") if choice in ckpt.backbone]
    if len(decays) > len(available):
        raise ValueError(f"ema.decays has {len(decays)} values but {ckpt.path} holds {len(available)} EMA(s): "
                         f"set ema.decays to at most {len(available)} values")
    ours = module.net.state_dict()
    emas = []
    for k, choice in enumerate(available[:len(decays)]):
        state = convert_state_dict(ckpt.backbone[choice])
        check_exact(ours, state, f"backbone ({choice})")
        emas.append(state)
        report.append(f"EMA {k + 1} (decay {decays[k]}): model_{choice}")
    return ReleasedStart(emas, report)


def released_optimizer_state(ckpt: ReleasedCheckpoint, module: nn.Module,
                             optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any] | None, str]:
    """(The released AdamW state for `optimizer`, keyed by parameter name as
    `load_full_optimizer_state_dict` takes it, or None for a fresh start; a report line).

    Loaded only if the released numbering maps onto names (group sizes as the released
    split gives them, every state tensor shaped as its parameter) and every parameter this
    run trains has released state; state of parameters this run does not train is dropped.
    The hyperparameters stay this run's."""
    try:
        released = _state_by_name(ckpt)
    except _Unmappable as reason:
        return None, f"optimizer: fresh AdamW state, the released one does not fit: {reason}"
    names = {id(p): name for name, p in module.named_parameters()}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    params = dict(module.named_parameters())
    trained = [name for group in groups for name in group["params"]]
    lacking = [name for name in trained if name not in released]
    if lacking:
        return None, (f"optimizer: fresh AdamW state, the released one has no state for '{lacking[0]}' "
                      f"({len(lacking)} of the {len(trained)} parameters this run trains)")
    for name in trained:
        for key, value in released[name].items():
            if key != "step" and value.shape != params[name].shape:
                return None, (f"optimizer: fresh AdamW state, the released '{key}' of '{name}' has shape "
                              f"{tuple(value.shape)}, the parameter {tuple(params[name].shape)}")
    dropped = sorted(set(released) - set(trained))
    steps = sorted({int(released[name]["step"]) for name in trained if "step" in released[name]})
    line = (f"optimizer: released AdamW state (step {', '.join(map(str, steps))}) for {len(trained)} parameters, "
            "mapped by name; learning rate, betas and weight decay from this run's config")
    if dropped:
        line += f"; dropped the state of {len(dropped)} parameter(s) this run does not train ('{dropped[0]}', ...)"
    return {"state": {name: released[name] for name in trained}, "param_groups": groups}, line


def _state_by_name(ckpt: ReleasedCheckpoint) -> dict[str, dict[str, Tensor]]:
    """The released per-parameter AdamW state under our `TrainingModule` names."""
    optimizer = ckpt.optimizer
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise _Unmappable("the checkpoint holds no optimizer state dict")
    order = ckpt.trainable
    groups = optimizer["param_groups"]
    if len(groups) == 1:
        split = [order]
    elif len(groups) == 2:  # misc.add_weight_decay: [no decay, decay]
        exempt = [len(shape) == 1 or name.endswith(".bias") for name, shape in order]
        split = [[p for p, skip in zip(order, exempt) if skip], [p for p, skip in zip(order, exempt) if not skip]]
    else:
        raise _Unmappable(f"it has {len(groups)} parameter groups; the released code makes 1 or 2")
    sizes = [len(group["params"]) for group in groups]
    if sizes != [len(part) for part in split]:
        raise _Unmappable(f"its groups hold {sizes} parameters, the released module's trainable parameters "
                          f"split into {[len(part) for part in split]}")
    indices = {}
    for group, part in zip(groups, split):
        indices.update(zip(group["params"], part))
    if len(indices) != len(order):
        raise _Unmappable("its groups list a parameter index twice")
    by_name = {}
    for index, state in optimizer["state"].items():
        if index not in indices:
            raise _Unmappable(f"it has state for parameter index {index}, which no group lists")
        name, shape = indices[index]
        for key, value in state.items():
            if key != "step" and tuple(value.shape) != tuple(shape):
                raise _Unmappable(f"'{key}' of parameter {index} ('{name}') has shape {tuple(value.shape)}, "
                                  f"the parameter {tuple(shape)}")
        by_name[_our_name(name)] = state
    return by_name


def _our_name(released: str) -> str:
    """A released module's parameter name as a `TrainingModule` name (`net.*`, `head.*`)."""
    if released.startswith(NET):
        return "net." + released_key_to_ours(released[len(NET):])
    return "head." + released_key_to_ours(released[len(ADAPTER):])
