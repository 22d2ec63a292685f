"""Data-parallel training (training/parallel.py): DDP and FSDP2 on CPU with gloo match one
process on the whole batch; accumulation, activation checkpointing, full state dicts."""

from __future__ import annotations

import copy
import faulthandler
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from pixelrepa.config import get_preset
from pixelrepa.objective import Draws, draw_randomness
from pixelrepa.training.module import TrainingModule
from pixelrepa.distributed import World, _env_from_slurm, _first_host, broadcast_object, init_distributed, reduce_mean, shutdown_distributed
from pixelrepa.training.parallel import (
    load_full_optimizer_state_dict,
    load_full_state_dict,
    no_sync_context,
    unwrap,
    wrap_for_training,
)
from helpers import randomize_

GLOBAL_BATCH = 8
STEPS = 3
WORLD = 2
SINGLE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# name -> (alignment mode, accumulation micro-steps per rank, activation checkpointing)
RUNS = {
    "pixelrepa": ("pixelrepa", 1, False),
    "accum_ckpt": ("pixelrepa", 2, True),
    "repa": ("repa", 1, False),  # a frozen parameter (the mask token) in the graph
}


# ---------------------------------------------------------------------------
# A few deterministic steps, shared by the single process and the workers
# ---------------------------------------------------------------------------

def make_config(mode: str):
    return get_preset("PixelREPA-Micro/8").replace(**{"align.mode": mode})


def build_module(mode: str, seed: int = 0) -> TrainingModule:
    torch.manual_seed(seed)
    return randomize_(TrainingModule(make_config(mode)), seed + 1)


def make_optimizer(wrapped: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(wrapped.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)


def whole_batch(config, step: int) -> tuple[torch.Tensor, Draws, torch.Tensor | None]:
    """Step `step`'s inputs, draws and targets for the whole global batch (same in every process)."""
    g = torch.Generator().manual_seed(1000 + step)
    m = config.model
    x = torch.rand(GLOBAL_BATCH, 3, m.input_size, m.input_size, generator=g) * 2 - 1
    y = torch.randint(0, m.num_classes, (GLOBAL_BATCH,), generator=g)
    draws = draw_randomness(x, y, m.num_classes, m.num_patches, config.objective, config.align, g)
    target = None
    if config.align.mode != "none":
        target = torch.randn(GLOBAL_BATCH, m.num_patches, config.align.encoder.feature_dim, generator=g)
    return x, draws, target


def rows(batch, index: slice):
    x, draws, target = batch
    keep = draws.keep[index] if draws.keep is not None else None
    sliced = Draws(t=draws.t[index], noise=draws.noise[index], labels=draws.labels[index], keep=keep)
    return x[index], sliced, (target[index] if target is not None else None)


def full_grads(wrapped) -> dict[str, torch.Tensor]:
    """Every gradient, whole (gathered from the shards under FSDP2). Collective."""
    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for name, p in unwrap(wrapped).named_parameters() if p.grad is not None}


def local_rows(rank: int):
    """Rank `rank`'s half of the first global batch."""
    half = GLOBAL_BATCH // WORLD
    return rows(whole_batch(make_config("pixelrepa"), 0), slice(rank * half, (rank + 1) * half))


def train(wrapped, optimizer, config, world: World, accum: int, steps: range):
    """Rank r takes its contiguous share of each global batch, in `accum` micro-batches.
    Returns the mean loss per step and the first step's gradients (AdamW would hide a wrong
    gradient scale, e.g. summed instead of averaged over ranks)."""
    per_rank = GLOBAL_BATCH // world.world_size
    micro = per_rank // accum
    losses, first_grads = [], None
    for step in steps:
        batch = whole_batch(config, step)
        total = 0.0
        for i in range(accum):
            start = world.rank * per_rank + i * micro
            with no_sync_context(wrapped, enabled=i < accum - 1):
                loss = wrapped(*rows(batch, slice(start, start + micro)))["total"] / accum
                loss.backward()
            total += loss.item()
        if first_grads is None:
            first_grads = full_grads(wrapped)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reduce_mean({"total": total}, world)["total"])
    return losses, first_grads


def run_single(mode: str, accum: int = 1, checkpointing: bool = False):
    module = build_module(mode)
    wrapped = wrap_for_training(module, "ddp", SINGLE, checkpointing)
    optimizer = make_optimizer(wrapped)
    losses, grads = train(wrapped, optimizer, module.config, SINGLE, accum, range(STEPS))
    return wrapped, optimizer, losses, grads


@pytest.fixture(scope="module")
def reference():
    """One process, whole batch, no accumulation: final model and optimizer state, losses."""
    out = {}
    for mode in ("pixelrepa", "repa"):
        wrapped, optimizer, losses, grads = run_single(mode)
        out[mode] = dict(model=full_state_dict(wrapped, SINGLE), grads=grads, losses=losses,
                         optim=full_optimizer_state_dict(wrapped, optimizer, SINGLE))
    return out


def assert_close_norm(actual: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """Relative error of the whole tensor. (Element-wise checks are too strict for Adam: an
    element whose gradient nearly cancels gets a step of order lr from rounding-level noise.)"""
    error = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert error <= rel * scale + 1e-12, f"{name}: relative error {error / max(scale, 1e-30):.3g}"


def assert_states_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert_close_norm(actual[key], expected[key], key)


# ---------------------------------------------------------------------------
# Two gloo processes
# ---------------------------------------------------------------------------

def _gathered(state: dict, info: World) -> dict | None:
    # Offloading leaves CPU tensors as the live ones: copy them so later steps leave the result alone.
    return copy.deepcopy(state) if info.is_main else None


def full_state_dict(wrapped, info: World) -> dict | None:
    """The whole model state on rank 0 (None elsewhere); collective."""
    return _gathered(get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True)), info)


def full_optimizer_state_dict(wrapped, optimizer, info: World) -> dict | None:
    """The whole optimizer state, keyed by parameter name, on rank 0; collective."""
    return _gathered(get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True)), info)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, mode: str, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung collective fails the test instead
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, also on a machine with GPUs
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed()
    results: dict = {"reduced": reduce_mean({"rank": float(rank), "tensor": torch.tensor(2.0 * rank)}, info),
                     "broadcast": broadcast_object({"from": rank}, info)}
    if mode == "ddp":  # gradients of this rank's half only: nothing synced inside no_sync
        wrapped = wrap_for_training(build_module("pixelrepa"), mode, info)
        with no_sync_context(wrapped, enabled=True):
            wrapped(*local_rows(rank))["total"].backward()
        results["no_sync_grads"] = full_grads(wrapped)
    for name, (align_mode, accum, checkpointing) in RUNS.items():
        module = build_module(align_mode)
        wrapped = wrap_for_training(module, mode, info, checkpointing)
        optimizer = make_optimizer(wrapped)
        losses, grads = train(wrapped, optimizer, module.config, info, accum, range(STEPS))
        results[name] = dict(model=full_state_dict(wrapped, info), losses=losses, grads=grads,
                             optim=full_optimizer_state_dict(wrapped, optimizer, info))
        if mode == "ddp":
            results[name]["local"] = {k: v.clone() for k, v in unwrap(wrapped).state_dict().items()}
        if name == "pixelrepa":
            # Resume: a differently initialised copy loads the full states; one more step on both.
            resumed = wrap_for_training(build_module(align_mode, seed=7), mode, info)
            resumed_optimizer = make_optimizer(resumed)
            load_full_state_dict(resumed, results[name]["model"])
            load_full_optimizer_state_dict(resumed, resumed_optimizer, copy.deepcopy(results[name]["optim"]))
            for w, o, key in ((wrapped, optimizer, "continued"), (resumed, resumed_optimizer, "resumed")):
                train(w, o, module.config, info, 1, range(STEPS, STEPS + 1))
                results[key] = full_state_dict(w, info)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    shutdown_distributed()
    faulthandler.cancel_dump_traceback_later()


def spawn(mode: str, out_dir) -> list[dict]:
    mp.spawn(_worker, args=(mode, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory):
    return spawn("fsdp2", tmp_path_factory.mktemp("fsdp2"))


@pytest.fixture(params=["ddp", "fsdp2"])
def results(request):
    return request.getfixturevalue(f"{request.param}_results")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("run", list(RUNS))
def test_two_processes_match_one_process_on_the_whole_batch(results, reference, run):
    """k AdamW steps with batch b per rank (optionally accumulated over micro-batches, with
    activation checkpointing) give the parameters of one process with batch 2b."""
    align_mode = RUNS[run][0]
    rank0, rank1 = results
    assert rank1[run]["model"] is None and rank1[run]["optim"] is None  # full state on rank 0 only
    assert_states_close(rank0[run]["model"], reference[align_mode]["model"])
    for rank in results:
        assert rank[run]["losses"] == pytest.approx(reference[align_mode]["losses"], rel=1e-5)
        assert_states_close(rank[run]["grads"], reference[align_mode]["grads"])
        if "local" in rank[run]:  # DDP: every replica holds the same weights
            assert_states_close(rank[run]["local"], reference[align_mode]["model"])


@pytest.mark.multiprocess
def test_full_optimizer_state_matches_one_process(results, reference):
    got, expected = results[0]["pixelrepa"]["optim"], reference["pixelrepa"]["optim"]
    assert got["param_groups"][0]["params"] == expected["param_groups"][0]["params"]
    assert list(got["state"]) == list(expected["state"])
    for fqn, state in expected["state"].items():
        for key, value in state.items():
            assert_close_norm(got["state"][fqn][key], value, f"{fqn}.{key}")


@pytest.mark.multiprocess
def test_full_state_has_the_training_module_keys(results):
    keys = list(TrainingModule(make_config("pixelrepa")).state_dict())
    state = results[0]["pixelrepa"]["model"]
    assert list(state) == keys
    assert all(v.device.type == "cpu" and not isinstance(v, DTensor) for v in state.values())


@pytest.mark.multiprocess
def test_resume_from_full_states_continues_identically(results):
    assert_states_close(results[0]["resumed"], results[0]["continued"])


@pytest.mark.multiprocess
def test_ddp_no_sync_keeps_gradients_local(ddp_results):
    for rank, result in enumerate(ddp_results):
        module = wrap_for_training(build_module("pixelrepa"), "ddp", SINGLE)  # the same kernels as the workers
        module(*local_rows(rank))["total"].backward()
        assert_states_close(result["no_sync_grads"], full_grads(module))


@pytest.mark.multiprocess
def test_reduce_mean_and_broadcast_object(ddp_results):
    for rank in ddp_results:
        assert rank["reduced"] == {"rank": 0.5, "tensor": 1.0}
        assert rank["broadcast"] == {"from": 0}


# ---------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------

def test_single_process_is_not_wrapped():
    module = build_module("pixelrepa")
    wrapped = wrap_for_training(module, "fsdp2", SINGLE)
    assert wrapped is module and unwrap(wrapped) is module
    assert reduce_mean({"a": torch.tensor(1.5), "b": 2}, SINGLE) == {"a": 1.5, "b": 2.0}
    assert broadcast_object([1], SINGLE) == [1]


def test_accumulation_matches_one_step_on_the_whole_batch(reference):
    """4 micro-batches with the loss scaled by 1/4 give the whole-batch step."""
    wrapped, optimizer, losses, grads = run_single("pixelrepa", accum=4)
    assert losses == pytest.approx(reference["pixelrepa"]["losses"], rel=1e-5)
    assert_states_close(grads, reference["pixelrepa"]["grads"])
    assert_states_close(full_state_dict(wrapped, SINGLE), reference["pixelrepa"]["model"])


def test_activation_checkpointing_keeps_loss_gradients_and_keys():
    config = make_config("pixelrepa")
    batch = rows(whole_batch(config, 0), slice(0, 4))
    results = []
    for checkpointing in (False, True):
        module = wrap_for_training(build_module("pixelrepa"), "ddp", SINGLE, checkpointing)
        calls = []
        module.net.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
        loss = module(*batch)["total"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((module, loss.detach(), grads, len(calls)))
    (plain, loss0, grads0, calls0), (ckpt, loss1, grads1, calls1) = results
    assert (calls0, calls1) == (1, 2)  # the block really is recomputed in backward
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert list(grads1) == list(grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    copied = copy.deepcopy(ckpt)
    assert copied.net.blocks[0].forward.__self__ is copied.net.blocks[0]


def test_load_full_state_single_process(reference):
    module = build_module("pixelrepa", seed=5)
    optimizer = make_optimizer(module)
    load_full_state_dict(module, reference["pixelrepa"]["model"])
    load_full_optimizer_state_dict(module, optimizer, copy.deepcopy(reference["pixelrepa"]["optim"]))
    assert_states_close(module.state_dict(), reference["pixelrepa"]["model"])
    assert optimizer.state[module.net.mask_token]["step"] == STEPS


# ---------------------------------------------------------------------------
# Launch environment
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04],other", "node01"),
    ("host1,host2", "host1"),
    ("gpu-a100", "gpu-a100"),
    ("node[07,09-12]", "node07"),
    ("rack[2-3]-n[001-004]", "rack2-n001"),
    ("pre[5]suffix,x[1-2]", "pre5suffix"),
])
def test_first_host_of_slurm_nodelist(nodelist, first):
    assert _first_host(nodelist) == first


def test_env_from_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gn[12-13]"}
    assert _env_from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                    "MASTER_ADDR": "gn12", "MASTER_PORT": "29500"}
    env.update(SLURM_STEP_NODELIST="gn13", MASTER_PORT="1234")
    assert _env_from_slurm(env)["MASTER_ADDR"] == "gn13"
    assert _env_from_slurm(env)["MASTER_PORT"] == "1234"
    assert _env_from_slurm({"PATH": "/bin"}) is None


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST")


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.setenv(name, "")  # records the original, so teardown restores (or removes) it
        monkeypatch.delenv(name)
    return monkeypatch


def test_init_distributed_single_process(clean_launch_env):
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not dist.is_initialized()


def test_init_distributed_reads_a_one_task_slurm_step(clean_launch_env):
    for name, value in dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                            SLURM_JOB_NODELIST="cn[3-4]").items():
        clean_launch_env.setenv(name, value)
    info = init_distributed()
    assert (info.rank, info.world_size) == (0, 1) and not dist.is_initialized()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["RANK"]) == ("cn3", "29500", "0")
