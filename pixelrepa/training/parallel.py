"""Multi-process training: DDP / FSDP2 wrapping and state for checkpoints.

One process per device (`pixelrepa.distributed` joins the process group);
`wrap_for_training` puts the `TrainingModule` under DDP or FSDP2 (optionally with
per-block activation checkpointing); `no_sync_context` skips gradient sync on the
accumulation micro-steps. `sharded_state` / `load_sharded_state` give and take the state
each rank holds, and `load_full_*` take a whole state from rank 0, always under the keys of
`TrainingModule.state_dict()`, so checkpoints do not depend on how a run was parallelised.

Typical use::

    world = init_distributed()
    module = TrainingModule(config)          # same seed on every rank (see wrap_for_training)
    wrapped = wrap_for_training(module, config.train.parallel, world, config.train.activation_checkpointing)
    optimizer = torch.optim.AdamW(wrapped.parameters(), ...)   # after wrapping
    for i, micro in enumerate(micro_batches):
        with no_sync_context(wrapped, enabled=i < len(micro_batches) - 1):
            (wrapped(*micro)["total"] / len(micro_batches)).backward()
    optimizer.step()
    ...
    shutdown_distributed()
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Any, Iterator, Literal, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from pixelrepa.config import KernelConfig, RunConfig
from pixelrepa.distributed import World, is_distributed
from pixelrepa.device import apply_kernels, resolve_compile
from pixelrepa.training.module import TrainingModule

ParallelMode = Literal["ddp", "fsdp2"]

# ---------------------------------------------------------------------------
# Wrapping
# ---------------------------------------------------------------------------

def _blocks(module: TrainingModule) -> list[nn.Module]:
    """The transformer blocks of the backbone and of the alignment head (if it has any)."""
    head_blocks = getattr(module.head, "blocks", None) if module.head is not None else None
    return list(module.net.blocks) + (list(head_blocks) if head_blocks is not None else [])


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class's forward, run under non-reentrant checkpointing: activations inside the
    # block are recomputed in backward (with the same RNG state, so dropout matches).
    return checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(module: TrainingModule) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Done by giving each block an instance-level `forward`, so module names and
    state-dict keys are unchanged (unlike `checkpoint_wrapper`), hooks (FSDP2's) still
    run around it, and a deep copy binds to its own block."""
    for block in _blocks(module):
        block.forward = types.MethodType(_checkpointed_forward, block)


def build_training_module(config: RunConfig, world: World) -> TrainingModule:
    """The TrainingModule, initialised from the global RNG (seed it first). Under FSDP2 with
    several processes only rank 0 builds it for real, on the host; the others build it on
    the meta device, and `wrap_for_training` gives every rank its shards of rank 0's weights,
    so no rank but one ever holds the whole fp32 model."""
    if config.train.parallel == "fsdp2" and is_distributed(world) and not world.is_main:
        with torch.device("meta"):
            return TrainingModule(config)
    return TrainingModule(config)


def fsdp_mixed_precision(config: RunConfig, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 parameters for compute, fp32 gradient reduction (`train.fsdp_bf16`; default on with CUDA)."""
    enabled = config.train.fsdp_bf16 if config.train.fsdp_bf16 is not None else device.type == "cuda"
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if enabled else None


def wrap_for_training(module: TrainingModule, mode: ParallelMode, world: World,
                      activation_checkpointing: bool = False, kernels: KernelConfig | None = None,
                      mixed_precision: MixedPrecisionPolicy | None = None) -> nn.Module:
    """Move `module` to `world.device` and wrap it for data-parallel training.

    - a single process: the module itself (no wrapper);
    - 'ddp': DistributedDataParallel, by default without unused-parameter search (the graph
      is static: TrainingModule freezes what its mode does not use);
    - 'fsdp2': `fully_shard` on every block of the backbone and the head, then on the root,
      with `mixed_precision` (see `fsdp_mixed_precision`). Parameters become sharded DTensors
      in place, so build the optimizer after wrapping. A module on the meta device (the other
      ranks of `build_training_module`) is materialised shard by shard.

    Both modes start every rank from rank 0's weights. Activation checkpointing is per
    block and leaves state-dict keys unchanged. `kernels` (default: KernelConfig()) picks
    the CPU linear kernel and torch.compile: with several processes 'model' compiles each
    block instead (as torchtitan does), so that DDP's all-reduce of a block's gradients and
    FSDP2's reduce-scatter overlap the backward of the blocks before it (a whole compiled
    graph releases its gradients only at its end). On the CPU, compile='auto' needs the
    run's length: pass `kernels_for_run(...)`.
    """
    kernels = kernels or KernelConfig()
    if mode not in ("ddp", "fsdp2"):
        raise ValueError(f"unknown parallel mode '{mode}' (ddp | fsdp2)")
    on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    if on_meta and not (mode == "fsdp2" and is_distributed(world)):
        raise ValueError("a module on the meta device is materialised only under FSDP2 with several processes")
    full_state = module.state_dict() if mode == "fsdp2" and world.is_main else {}
    if not on_meta:
        module.to(world.device)
    if activation_checkpointing:
        apply_activation_checkpointing(module)
    if resolve_compile(kernels, world.device) == "model" and is_distributed(world):
        kernels = dataclasses.replace(kernels, compile="blocks")
    apply_kernels(module, _blocks(module), kernels, world.device)
    if not is_distributed(world):
        return module
    if mode == "ddp":
        device_ids = [world.local_rank] if world.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                       find_unused_parameters=kernels.ddp_find_unused_parameters)
    shard_options = {"mp_policy": mixed_precision} if mixed_precision is not None else {}
    for block in _blocks(module):
        fully_shard(block, **shard_options)
    fully_shard(module, **shard_options)
    if on_meta:
        module.to_empty(device=world.device)
    with torch.no_grad():
        for buffer in module.buffers():  # not sharded; the meta ranks' (RoPE tables...) are empty
            dist.broadcast(buffer, src=0)
    set_model_state_dict(module, full_state, options=StateDictOptions(full_state_dict=True,
                                                                      broadcast_from_rank0=True))
    return module


def unwrap(wrapped: nn.Module) -> TrainingModule:
    """The TrainingModule inside (under FSDP2 it is the wrapped module itself)."""
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


@contextlib.contextmanager
def no_sync_context(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """While enabled, backward accumulates local gradients without syncing ranks (for
    all but the last accumulation micro-step). Without a wrapper it does nothing."""
    if not enabled:
        yield
    elif isinstance(wrapped, DistributedDataParallel):
        with wrapped.no_sync():
            yield
    elif isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------------
# State for checkpoints
# ---------------------------------------------------------------------------

def _load_options() -> StateDictOptions:
    # A full state on rank 0 is broadcast (and sharded where needed) to the other ranks.
    if dist.is_initialized():
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions()


def sharded_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`{"model": ..., "optimizer": ...}` as this rank holds them (FSDP2: its shards as DTensors;
    otherwise whole tensors), under `TrainingModule.state_dict()`'s keys in every mode, for
    `torch.distributed.checkpoint`. A fresh optimizer's state is first created (a step at lr 0
    with zero gradients, which changes no parameter) so that a checkpoint can be read into it."""
    return {"model": get_model_state_dict(wrapped), "optimizer": get_optimizer_state_dict(wrapped, optimizer)}


def load_sharded_state(wrapped: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Put a `sharded_state` layout (as read from a checkpoint) into the model and optimizer."""
    set_model_state_dict(wrapped, state["model"])
    set_optimizer_state_dict(wrapped, optimizer, state["optimizer"])


def load_full_state_dict(wrapped: nn.Module, state: Mapping[str, Tensor] | None) -> None:
    """Load a whole model state (`TrainingModule.state_dict()` keys). In a process group only rank
    0's `state` is read (others may pass None); it is broadcast and sharded as needed.
    Keys must match exactly. Collective."""
    set_model_state_dict(wrapped, dict(state or {}), options=_load_options())


def load_full_optimizer_state_dict(wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                                   state: Mapping[str, Any] | None) -> None:
    """Load a whole optimizer state (keyed by parameter name); in a process group only rank
    0's `state` is read. Collective. Like `Optimizer.load_state_dict`, the optimizer may keep
    (and go on to update) tensors of `state`: pass a copy if `state` is used afterwards."""
    set_optimizer_state_dict(wrapped, optimizer, dict(state or {}), options=_load_options())
