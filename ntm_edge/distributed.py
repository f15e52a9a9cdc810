"""Training on several processes under torchrun: DistributedDataParallel, or FSDP2 (``fully_shard``)
for the large presets. No launcher of our own: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and
the rendezvous), and ``ntm-edge train`` reads them, so one command runs on one process or many:

    torchrun --nproc-per-node 4 -m ntm_edge train --preset base ...

Rank 0 alone logs, draws progress bars and writes checkpoints; it also reads the checkpoint to
resume from and hands it to the other ranks (nodes need not share a file system for --out).

Randomness (why a run does not depend on its world size): a step's global batch is world x
accumulation micro-batches of --batch-size. Micro-batch k (rank r computes k = r * accum + a for
a < accum) draws its examples and noise from its own generator: k = 0 from the run's generator,
whose state is checkpointed (so one process without accumulation trains exactly as before), and
k >= 1 from one seeded by (seed, step, k). Which process computes micro-batch k depends on the world
size; what it draws does not. Two processes with --grad-accum 1 and one with --grad-accum 2 train
the same run (up to the order of floating-point sums), and a checkpoint resumes on any world size.
Each micro-batch samples the whole training set with replacement, as one process does: the ranks
see independent draws, which is what a DistributedSampler's disjoint shards give a sampler without
replacement.

A rank that dies or stops answering ends the others' collectives with an error (the collective
timeout bounds a silent hang: NTM_EDGE_DIST_TIMEOUT seconds, default 600); they print one line and
exit 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import NtmError


class PeerLost(NtmError):
    """Another rank died or stopped answering: this rank cannot go on."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, world size, and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def join(device: str) -> World:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") and torch.cuda.is_available()  # else the caller's validation says so
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("NTM_EDGE_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return World(rank=rank, size=size, device=device)


# Set by ``leave`` once this process has left a gloo group; ``end_process`` then ends it with os._exit.
_LEFT_GLOO = False


def leave(world: World) -> None:
    """Leave the process group (a barrier first: no rank tears gloo down while another still has
    collectives in flight). Under gloo, the process should then end through ``end_process``."""
    global _LEFT_GLOO
    if world.distributed and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to wait for
            dist.barrier()
        dist.destroy_process_group()
        _LEFT_GLOO = _LEFT_GLOO or gloo


def end_process(code: int) -> None:
    """End a torchrun worker that used gloo with ``os._exit(code)``, its output flushed; return at once
    in any other process (the interpreter then exits as usual).

    Why (the FSDP2 exit abort): once FSDP2 or any DTensor operation has run on a gloo group (even
    ``fully_shard`` alone, or ``distribute_tensor``), ``destroy_process_group`` no longer ends that
    group (torch 2.13): its two worker threads (``pt_gloo_runloop``) and gloo's socket thread
    (``gloo_tcp_loop``) are still running after it and after ``gc.collect()``, also with DTensor's
    sharding caches cleared and the DeviceMeshes' own references to the group dropped, so what keeps
    it is outside Python's reach. Those threads live into interpreter shutdown, where a rank
    intermittently aborted with "terminate called without an active exception" after the run had
    finished and saved. After plain collectives the threads end with it (DDP never showed the abort).
    ``os._exit`` skips the interpreter's shutdown and the C++ static destructors, the only code
    that was left to run when the abort came (which C++ thread aborts is not pinned down: the abort
    did not reproduce in 16 runs here, so no backtrace of it was taken). Nothing is lost by it: checkpoints are written
    and fsync'ed before the command returns (fileio.py), and stdout and stderr are flushed here.
    ``code`` is the command's exit status, so a failed rank still exits non-zero."""
    if not _LEFT_GLOO:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def reporting(world: World):
    """Run one rank's part of a command, then leave the process group. Errors: an NtmError that every
    rank meets (a bad option, a corrupt checkpoint) is printed by rank 0 alone (``quiet`` elsewhere);
    a collective that fails because another rank died is one PeerLost line on this rank, and SIGTERM
    (torchrun stopping the other ranks) no longer cuts it short."""
    try:
        yield
    except (PeerLost, RuntimeError) as e:
        lost = e if isinstance(e, PeerLost) else peer_failure(world, e)  # DDP's backward: a RuntimeError
        if lost is None:
            raise
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise lost from None
    except NtmError as e:
        if not world.main:
            e.quiet = True
        raise
    finally:
        leave(world)


# what a failed collective says, in gloo's, NCCL's and c10d's words
_PEER_FAILURE = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "broken pipe")


def peer_failure(world: World, e: BaseException) -> PeerLost | None:
    """``e`` as one PeerLost line when it is a collective that failed (a rank died or went silent);
    None for any other error. DDP's all-reduce inside backward raises a plain RuntimeError."""
    text = str(e).strip()
    if not world.distributed or not (isinstance(e, dist.DistError) or
                                     (isinstance(e, RuntimeError) and any(w in text.lower() for w in _PEER_FAILURE))):
        return None
    first = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else e.__class__.__name__)  # "[pair.cc:537] "
    first = first.split(". ")[0][:160]
    return PeerLost(f"rank {world.rank}: lost contact with another rank ({first}); the run stops; "
                    "continue it from the last checkpoint with --resume")


def collective(world: World, fn, *args):
    """Run a collective; a lost or silent peer becomes one PeerLost line instead of a traceback."""
    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as e:
        lost = peer_failure(world, e)
        if lost is None:
            raise
        raise lost from None


def sum_all(world: World, t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (``t`` itself on one process)."""
    if world.distributed:
        collective(world, dist.all_reduce, t)
    return t


def from_main(world: World, fn):
    """``fn()`` on rank 0, its result (or its NtmError) handed to every rank: what only rank 0 may do
    (read --out, which other nodes may not see) without the other ranks waiting forever on an error."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except NtmError as e:
            error = e
    if world.distributed:
        box = [(result, None if error is None else (type(error), str(error)))]
        collective(world, dist.broadcast_object_list, box, 0)
        result, failed = box[0]
        if failed is not None and error is None:
            error = failed[0](failed[1])
            error.quiet = True  # rank 0 prints it
    if error is not None:
        raise error
    return result


def micro_generator(g: torch.Generator, seed: int, step: int, k: int, device) -> torch.Generator:
    """The generator of micro-batch ``k`` of ``step``: the run's own ``g`` for k = 0, else a fresh one
    seeded by (seed, step, k)."""
    if k == 0:
        return g
    digest = hashlib.sha256(f"ntm-edge/{seed}/{step}/{k}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# -- wrapping and state ----------------------------------------------------------------------------

def wrap(world: World, module: torch.nn.Module, shard: bool) -> torch.nn.Module:
    """DDP, or FSDP2 over every transformer layer, U-Net block and the root (``shard``); as is on one process."""
    if not world.distributed:
        return module
    if shard:
        from torch.distributed.fsdp import fully_shard

        from .layers import TransformerLayer
        from .predictor import ResBlock

        for sub in module.modules():
            if isinstance(sub, TransformerLayer | ResBlock):
                fully_shard(sub)
        fully_shard(module)  # in place: the module is now an FSDPModule
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(world.device).index] if world.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def full(world: World, value):
    """``value`` (a tensor, or dicts / lists of them) with every sharded tensor gathered whole, on CPU.
    A collective under FSDP: every rank calls it, in the same order."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return collective(world, value.full_tensor).detach().cpu()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: full(world, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full(world, v) for v in value)
    return value


def shard_like(value, template):
    """``value`` (whole tensors, as ``full`` returns) laid out as ``template``: a DTensor in the
    template becomes this rank's shard of the matching whole tensor; anything else moves to the
    template's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(template, DTensor):
        return distribute_tensor(value.to(template.device_mesh.device_type), template.device_mesh, template.placements)
    if isinstance(template, torch.Tensor):
        return value.to(template.device)
    if isinstance(template, dict):
        return {k: shard_like(value[k], template[k]) if k in template else value[k] for k in value}
    if isinstance(template, list | tuple):
        return type(template)(shard_like(v, t) for v, t in zip(value, template, strict=True))
    return value


@contextlib.contextmanager
def no_sync(module: torch.nn.Module, skip: bool):
    """Skip the gradient reduction of an accumulation micro-step (DDP's no_sync, FSDP2's
    set_requires_gradient_sync); wraps the micro-step's forward and backward."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if skip and isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif skip and isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def accumulate(world: World, module: torch.nn.Module, accum: int, micro, flags) -> tuple[list[float], list[bool]]:
    """The forward and backward of one optimizer step: ``accum`` micro-batches on this rank, their
    gradients summed (DDP / FSDP average them over the ranks at the last micro-batch's backward).

    ``micro(k)`` computes global micro-batch k (k = rank * accum + a) and returns a 1-D tensor of
    terms whose first entry is the loss to minimise. Returns the terms averaged over every
    micro-batch of every rank, and, for each of ``flags`` (this rank's booleans), whether any rank
    raised it: one small all-reduce per step, so that all ranks agree on the loss and on stopping.
    """
    sums: torch.Tensor | None = None
    for a in range(accum):
        with no_sync(module, a < accum - 1):
            terms = micro(world.rank * accum + a)
            (terms[0] if accum == 1 else terms[0] / accum).backward()
        terms = terms.detach().double().cpu()
        sums = terms if sums is None else sums + terms
    assert sums is not None  # accum >= 1
    total = sum_all(world, torch.cat([sums, torch.tensor([float(f) for f in flags], dtype=torch.float64)]))
    n = len(sums)
    return (total[:n] / (world.size * accum)).tolist(), [v > 0 for v in total[n:].tolist()]
