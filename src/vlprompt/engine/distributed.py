"""One training run over several processes: ``torchrun --nproc-per-node N -m vlprompt train ...``.

torchrun (``python -m torch.distributed.run``, also with ``--nnodes`` and its own rendezvous) starts N processes
with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in their environment; :func:`session`
initialises ``torch.distributed`` from them (NCCL on CUDA, one GPU per local rank; gloo on CPU). Then:

* every rank draws the same global batches as a single-process run (the epoch permutation and the view choice
  come from the generator seeded by (seed, epoch)) and keeps a contiguous slice of each (:func:`batch_slice`);
  its loss is weighted by its share of the batch and the gradients of the learned tensors are summed over the
  ranks (:func:`all_reduce_gradients`), which gives the gradient of the global batch's mean loss;
* feature extraction: rank r encodes its share of the images into the feature cache (whose index is written
  under a file lock), a barrier, then every rank reads all of them (:class:`RankSharedCache`);
* evaluation: each rank computes the logits of a contiguous share of the images; they are gathered in order
  (:func:`gather_rows`);
* only rank 0 writes the run directory (checkpoints, logs, metrics, results); resuming reads the checkpoint on
  every rank.

Why an explicit all-reduce and not ``DistributedDataParallel``: the learned tensors are few and small (a CoOp
context is 16 x 512 floats), so DDP's overlap of communication with backward buys nothing, and DDP's reducer
requires a backward after every forward -- the engine's skipped steps (a non-finite loss under
``--nonfinite skip`` or fp16) run a forward without backward, after which DDP raises on the next step. One
flat ``all_reduce`` of the gradients per step is the same arithmetic as DDP's averaging, under torch's own
collectives.

A rank that dies stops the job: torchrun's elastic agent ends the other ranks, and a rank blocked in a
collective fails after ``VLPROMPT_DIST_TIMEOUT_S`` seconds (default 1800) instead of hanging forever;
``--resume`` continues from the last checkpoint that rank 0 wrote.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError, VLPromptError

log = logging.getLogger("vlprompt")

TIMEOUT_ENV = "VLPROMPT_DIST_TIMEOUT_S"


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) as one of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from e


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes the run directory."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError as e:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from e
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def rank_device(device: Optional[str]) -> Optional[str]:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); an explicit
    ``cuda:i`` is refused with several ranks (every rank would take the same GPU)."""
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda:"):
        raise ConfigError(f"--device {device}: under torchrun each rank takes the GPU of its local rank; pass "
                          f"--device cuda (or set CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is available on this node")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s): start at "
                              f"most that many processes per node (--nproc-per-node)")
        return f"cuda:{local}"
    return name


@dataclass
class Session:
    device: Optional[str]  # this rank's device (None: the configuration's own)
    rank: int = 0
    world_size: int = 1


@contextlib.contextmanager
def session(device: Optional[str]) -> Iterator[Session]:
    """Initialise ``torch.distributed`` from torchrun's environment for the duration of a run (nothing happens in
    a single process); non-zero ranks log warnings only. The group is destroyed afterwards if this call made it."""
    if not launched():
        yield Session(device)
        return
    dev = rank_device(device)
    made = False
    if not dist.is_initialized():
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend=backend, timeout=_timeout())
        made = True
    logger = logging.getLogger("vlprompt")
    level = logger.level
    if dist.get_rank() != 0:
        logger.setLevel(logging.WARNING)  # one console voice: rank 0's
    try:
        yield Session(dev, dist.get_rank(), dist.get_world_size())
    finally:
        logger.setLevel(level)
        if made:
            dist.destroy_process_group()


# -- batches ----------------------------------------------------------------------------------------
def share(n: int, r: Optional[int] = None, world: Optional[int] = None) -> slice:
    """The contiguous share of ``n`` items that rank ``r`` takes (sizes differ by at most one)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    return slice((r * n) // world, ((r + 1) * n) // world)


def check_supported(method, train_cfg, n_train: int) -> None:
    """Refuse (before anything is written) what data parallelism would silently change.

    A loss that couples the images of a batch (the ordinal methods' text-to-image term over the batch) and
    BatchNorm in a trained image encoder compute on each rank's slice only: their numbers would depend on the
    number of processes. A rank with no image in a batch has nothing to learn from."""
    if not active():
        return
    world = world_size()
    name = type(method).__name__
    batch_norm = [m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                  and any(p.requires_grad for p in m.parameters())]
    if batch_norm:
        raise VLPromptError(f"{name} trains BatchNorm layers (its image encoder): under torchrun their batch "
                            f"statistics would be computed per rank; run it in one process")
    if type(method).batch_coupled:
        raise VLPromptError(f"{name}'s loss couples the images of a batch (not a mean of per-image terms): "
                            f"data-parallel slices would change it; run it in one process")
    if train_cfg is not None:
        smallest = min(train_cfg.batch_size or n_train, n_train)
        if train_cfg.last_batch == "keep" and train_cfg.batch_size and n_train % train_cfg.batch_size:
            smallest = min(smallest, n_train % train_cfg.batch_size)
        if smallest < world:
            raise ConfigError(f"train.batch_size (--batch-size) {train_cfg.batch_size} with {n_train} training "
                              f"images gives batches of {smallest}, fewer than the {world} ranks: every rank needs "
                              f"an image of each batch")


# -- collectives ---------------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks, in one flat buffer (a parameter without a gradient on a
    rank contributes zeros; every rank ends with the same gradients)."""
    if not active():
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset:offset + n].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n


def all_reduce_tensors(tensors: list, like: Sequence[torch.Tensor]) -> None:
    """Sum a list of gradients over the ranks in place (``tensors[i]`` of the shape of ``like[i]``; a None
    becomes the summed tensor, zeros where no rank had one)."""
    if not active() or not tensors:
        return
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(tensors, like)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for i, p in enumerate(like):
        n = p.numel()
        tensors[i] = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) tensor along dim 0 in rank order (n_r may differ between ranks)."""
    if not active():
        return x
    world = world_size()
    home = x.device
    device = (torch.device("cpu") if dist.get_backend() == "gloo"
              else torch.device("cuda", torch.cuda.current_device()))  # NCCL moves CUDA tensors only
    x = x.to(device)
    sizes = torch.tensor([x.shape[0]], device=device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    top = max(counts)
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[:x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts)]).to(home)


# -- feature extraction --------------------------------------------------------------------------------
class RankSharedCache:
    """A :class:`~vlprompt.backbone.cache.FeatureCache` whose ``get`` splits the encoding over the ranks: rank r first
    encodes (and stores) its share of the missing images, a barrier, then every rank reads all of them from the
    cache (hits). The cache's index is read-modified-written under a file lock, so concurrent shards from
    several ranks never race. Everything else is the wrapped cache's."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def _encode_share(self, backbone, paths, args, kwargs) -> None:
        if active() and isinstance(paths, (list, tuple)) and len(paths) >= world_size():
            self._cache.get(backbone, list(paths)[share(len(paths))], *args, **kwargs)
            barrier()

    def get(self, backbone, paths, *args, **kwargs):
        self._encode_share(backbone, paths, args, kwargs)
        return self._cache.get(backbone, paths, *args, **kwargs)

    def open(self, backbone, paths, *args, **kwargs):
        """As :meth:`get`, but the rows are read lazily, batch by batch (the cached training views)."""
        self._encode_share(backbone, paths, args, kwargs)
        return self._cache.open(backbone, paths, *args, **kwargs)
