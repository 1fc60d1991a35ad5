"""CoCoOp (Zhou et al., CVPR 2022): the context conditioned on each image through a small meta-network.

The reference runs one image at a time (its text tower encodes K prompts per image, batch 1). Here a whole batch
runs at once: each image's ``<sot> + context`` prefix is computed once and the class tokens attend to it (the
text encoder's grouped shared-prefix path). How many prompts are encoded per text-tower call follows a memory
budget (``text_memory_mb``): a training batch whose B x K prompts' saved activations fit it is encoded in one
call and nothing is recomputed; a larger one is encoded in chunks that fit, each recomputed in backward
(checkpointing: the same gradients for one more forward pass). A fixed chunk of prompts would recompute as soon
as B x K exceeds it, and batching would then cost as much per image as batch 1.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ..base import Features, opt
from ..parts.context import ContextPromptMethod
from ..parts.options import ContextOptions
from ..parts.originals import check_known_tensors, check_trainer, dassl_context_import, shape

log = logging.getLogger("vlprompt")

#: floats saved for backward per suffix token, layer and width unit of the text tower: 13-14 measured with
#: torch.autograd.graph.saved_tensors_hooks (fp32, widths 64 and 512, suffixes of 4 and 13 tokens); 16 keeps a
#: margin. Without gradients one layer's activations live at a time.
SAVED_FLOATS_PER_TOKEN = 16
#: the automatic budget: this fraction of the memory free on the device (CUDA) or available (CPU: MemAvailable,
#: which counts the reclaimable page cache) when the method is built
AUTO_BUDGET_FRACTION = 0.5
_FALLBACK_BUDGET = 2 << 30  # where the OS does not say how much memory is available


@dataclass
class CoCoOpConfig(ContextOptions):
    init: Optional[str] = opt("a photo of a", "initialise the context from words ('none': random N(0, init_std))")
    text_memory_mb: Optional[float] = opt(
        None, "memory (MB) the text tower's activations may take: a training batch whose B x K prompts fit is "
        "encoded at once with nothing recomputed, a larger one in chunks recomputed in backward (same gradients, "
        "one more forward pass); default: half the memory available when the run starts", gt=0)


def available_memory_bytes(device: torch.device) -> int:
    """Bytes free on a CUDA device, or available to this process on the host (CPU: the kernel's MemAvailable, which
    counts the page cache it can reclaim -- the free pages alone, often half of it, would force recomputation that
    memory does not)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    host = None
    try:
        with open(MEMINFO, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if host is None:
        try:
            host = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system that says it
            host = _FALLBACK_BUDGET
    room = cgroup_memory_room()  # a Slurm job's or a container's limit, below the host's memory
    return host if room is None else min(host, room)


#: where the kernel says how much memory the host has available, and the memory limit and use of this process's
#: cgroup (v2, then v1)
MEMINFO = "/proc/meminfo"
CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def cgroup_memory_room() -> Optional[int]:
    """Bytes this process's cgroup may still take (its limit minus its use), or None without a limit."""
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit (v1 writes a huge number)
            return None
        return max(int(limit) - usage, 0)
    return None


class CoCoOp(ContextPromptMethod):
    name = "cocoop"
    family = "prompts"
    config_class = CoCoOpConfig
    original_format = "dassl"
    summary = ("context conditioned on each image by a meta-network. The paper's recipe trains one image per "
               "optimizer step (batch 1, 10 epochs); --batch-size B takes B images per step, i.e. B times fewer "
               "optimizer steps, and runs the B images' prompts together")

    @classmethod
    def preset(cls, data) -> dict:
        """The paper's recipe, KaiyangZhou/CoOp ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``:
        ``DATALOADER.TRAIN_X.BATCH_SIZE: 1`` (line 3), ``OPTIM``: sgd, lr 0.002, 10 epochs, cosine, one constant
        warm-up epoch at 1e-5 (lines 16-22), ``TRAINER.COCOOP``: N_CTX 4 from "a photo of a" (lines 33-34, the
        config's defaults); momentum 0.9 and weight decay 5e-4 are Dassl's defaults (``dassl/config/defaults.py``,
        ``_C.OPTIM``). The same for every dataset (scripts/cocoop/base2new_train.sh uses this one config).
        ``--batch-size B`` > 1 takes B images per step: B times fewer optimizer steps than the paper."""
        return {"train": {"batch_size": 1, "epochs": 10, "optimizer": "sgd", "lr": 0.002, "momentum": 0.9,
                          "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5},
                "method_options": {"init": "a photo of a"}}

    @classmethod
    def import_original(cls, run):
        """A KaiyangZhou/CoOp CoCoOp run: ``ctx`` (M, D), the meta-network ``meta_net.linear{1,2}.{weight,bias}``
        and the config (TRAINER.COCOOP; the class name always at the end)."""
        check_trainer(run, "CoCoOp", "cocoop")
        meta = {f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        check_known_tensors(run, {"ctx", "token_prefix", "token_suffix"} | meta, "CoCoOp prompt learner")
        ctx = run.state.get("ctx")
        if ctx is None or ctx.dim() != 2:
            raise CheckpointError(f"{run.path}: ctx has shape {shape(ctx) if ctx is not None else None}; CoCoOp saves "
                                  f"(n_ctx, dim)")
        extra = {k: (k, run.state[k], run.state[k]) for k in sorted(meta) if k in run.state}
        return dassl_context_import(cls, run, ctx=ctx, mapped=ctx[None, None], section="TRAINER.COCOOP", options={},
                                    extra_state=extra, class_position=False)

    @classmethod
    def config_for_loading(cls, options: dict) -> dict:
        # runs saved before the memory budget recorded fixed chunk sizes (they never changed the numbers)
        return {k: v for k, v in options.items() if k not in ("chunk_size", "image_chunk")}

    def __init__(self, config: CoCoOpConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)  # a unified context; chunks follow the memory budget
        if config.text_memory_mb is not None:
            self.text_memory_bytes = int(config.text_memory_mb * 2 ** 20)
        else:
            self.text_memory_bytes = int(available_memory_bytes(backbone.device) * AUTO_BUDGET_FRACTION)
        self._recompute_logged = False  # the log says once when a batch is recomputed in backward
        e, d = backbone.embed_dim, backbone.text.width
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(e, max(e // 16, 1))),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(max(e // 16, 1), d)),
        ])).to(backbone.device)

    def describe(self) -> dict:
        return {"text_memory_mb": round(self.text_memory_bytes / 2 ** 20, 1)}

    def prompt_bytes(self, grad: bool) -> int:
        """Estimated bytes of one prompt's text-tower activations: all layers' saved tensors (``grad``) or one
        layer's working set; the suffix up to the longest class name's end token (the shared-prefix path)."""
        te = self.backbone.text
        s = int(self.prompt.eot.max()) + 1 - (1 + self.prompt.shared_len)
        per_layer = SAVED_FLOATS_PER_TOKEN * s * te.width * 4  # fp32: autocast halves it, a safe overestimate
        return per_layer * (len(te._blocks) if grad else 1)

    def text_chunk(self, batch: int, grad: bool) -> Optional[int]:
        """Prompts per text-tower call for ``batch`` images: None (all B x K at once, nothing recomputed) when
        they fit ``text_memory_bytes``, else as many as fit (at least one)."""
        fit = self.text_memory_bytes // max(self.prompt_bytes(grad), 1)
        return None if batch * self.num_classes <= fit else max(int(fit), 1)

    def forward(self, feats: Features) -> torch.Tensor:
        image = F.normalize(feats.global_.float(), dim=-1)  # (B, E)
        shift = self.meta_net(image)  # (B, D)
        grad = torch.is_grad_enabled() and shift.requires_grad
        chunk = self.text_chunk(image.shape[0], grad)
        if grad and chunk is not None and not self._recompute_logged:
            self._recompute_logged = True  # once per run: every step of this batch size does the same
            n = image.shape[0] * self.num_classes
            log.warning("cocoop: the %d image-conditioned prompts of a batch of %d need about %.0f MB of text-tower "
                        "activations, over the budget of %.0f MB (text_memory_mb): encoded in chunks of %d prompts, "
                        "each recomputed in backward (the same gradients, one more forward pass of the text tower; a "
                        "larger --text-memory-mb or a smaller --batch-size avoids it)", n, image.shape[0],
                        n * self.prompt_bytes(True) / 2 ** 20, self.text_memory_bytes / 2 ** 20, chunk)
        # one call for the whole batch: its chunks (if any) are checkpointed, so saved memory stays in the budget
        text = F.normalize(self.prompt.encode(shift, chunk_size=chunk), dim=-1)  # (B, K, E)
        return self.logit_scale * torch.einsum("be,bke->bk", image, text)

    def forward_per_image(self, feats: Features) -> torch.Tensor:
        """The reference's computation, one image at a time and full-length prompts (for tests)."""
        image = F.normalize(feats.global_.float(), dim=-1)
        shift = self.meta_net(image)
        rows = []
        for b in range(image.shape[0]):
            prefix, suffix, eot = self.prompt.prompt_embeddings(shift[b:b + 1])
            text = self.backbone.text.encode_prompts(prefix, suffix, eot, mode="plain", chunk_size=None)[0]
            rows.append(self.logit_scale * F.normalize(text, dim=-1) @ image[b])
        return torch.stack(rows)

    def export_head(self):
        """CoCoOp's text features depend on each image: the head keeps the learned context and meta-network,
        and ``predict`` runs the text tower (there is no fixed class head to export)."""
        return None
