"""Text encoding of learned prompts with no wasted work.

Prompt learners hand the text tower token *embeddings* instead of token ids. A prompt is split into a
``prefix`` (positions ``0..P-1``: the start token and whatever context comes before the first token that
differs between prompts) and a ``suffix`` (the rest: class name, ".", end token, padding). Three paths give the
same numbers:

* ``plain``: the whole sequence at the model's context length (77), exactly as CLIP runs it. The reference
  and the fallback (towers without a causal mask, e.g. MobileCLIP, take this path).
* ``cut``: the sequence cut after the last end-of-text (EOT) position of the batch. Exact because the mask is
  causal: nothing after a token can change it.
* ``prefix``: the prefix is run once (per group) and every prompt's suffix tokens attend to its cached keys
  and values, layer by layer, as in a key/value cache. Exact for the same reason; the prefix positions are the
  bulk of a CoOp prompt (SOT + 16 context vectors), so this removes most of the work.

Groups: the prefix may be shared by all prompts ``(P, D)`` or differ per group ``(G, P, D)`` (one group per
image for CoCoOp, per prompt set for PLOT), with suffixes shared by the groups ``(K, S, D)`` or per group
``(G, K, S, D)``. Many prompts are encoded in chunks; under autograd each chunk is checkpointed, so memory stays
bounded for K = 1000+ while gradients stay exact.

Under ``torch.distributed`` (a torchrun job), inside :meth:`TextEncoder.class_sharded`, the K prompts are split
over the ranks: rank r encodes its contiguous share and the features are gathered with
``torch.distributed.nn.functional.all_gather``, whose backward returns to each rank the gradient of every
rank's loss for its share; summing the learned tensors' gradients over the ranks then gives the same gradient as
every rank encoding all K prompts, with the text tower's work and memory per rank divided by N.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import BackboneError
from .patches import TextLayerPrompts, replace_positions

MODES = ("auto", "plain", "cut", "prefix")


class TextEncoder:
    """A view over the frozen text tower of an open_clip model (it owns no parameters of its own).

    ``D`` is the tower width (token embedding size), ``E`` the joint embedding size.
    """

    def __init__(self, *, token_embedding: nn.Embedding, positional_embedding: torch.Tensor,
                 transformer: nn.Module, ln_final: nn.Module, text_projection, attn_mask: Optional[torch.Tensor],
                 pool_type: str, eos_id: Optional[int], tokenizer=None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 unsupported: Optional[str] = None):
        self._parts = {
            "token_embedding": token_embedding, "transformer": transformer, "ln_final": ln_final,
            "text_projection": text_projection,
        }
        self._positional = positional_embedding
        self._attn_mask = attn_mask
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.tokenizer = tokenizer
        self.autocast = autocast
        self.unsupported = unsupported
        self._class_sharded = False
        blocks = list(getattr(transformer, "resblocks", []))
        self._blocks = blocks
        self.causal = attn_mask is not None
        self.fast_ok = (self.causal and unsupported is None and pool_type in ("argmax", "eos") and all(
            hasattr(b, "attn") and isinstance(b.attn, nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
            and hasattr(b, "ln_1") and hasattr(b, "mlp") for b in blocks))

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer=None, autocast=contextlib.nullcontext) -> "TextEncoder":
        tower = model.text if hasattr(model, "text") else model
        if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
            # e.g. Hugging Face text towers: strings still encode through open_clip, prompts cannot be learned
            return cls(token_embedding=None, positional_embedding=None, transformer=nn.Identity(),
                       ln_final=nn.Identity(), text_projection=None, attn_mask=None, pool_type="none",
                       eos_id=None, tokenizer=tokenizer, autocast=autocast,
                       unsupported=f"the text tower {type(tower).__name__} does not take token embeddings")
        unsupported = None
        if getattr(tower, "cls_emb", None) is not None:
            unsupported = "text towers with a class embedding (CoCa) are not supported for learned prompts"
        if getattr(tower, "use_pad_mask", False):
            unsupported = "text towers with a padding mask are not supported for learned prompts"
        return cls(token_embedding=tower.token_embedding, positional_embedding=tower.positional_embedding,
                   transformer=tower.transformer, ln_final=tower.ln_final,
                   text_projection=getattr(tower, "text_projection", None),
                   attn_mask=getattr(tower, "attn_mask", None),
                   pool_type=getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax")),
                   eos_id=getattr(tower, "text_eos_id", getattr(tower, "eos_id", None)),
                   tokenizer=tokenizer, autocast=autocast, unsupported=unsupported)

    # -- shapes ---------------------------------------------------------------------------------
    def _require(self):
        if self.unsupported:
            raise BackboneError(f"learned prompts need a CLIP-style text transformer: {self.unsupported}")

    @property
    def context_length(self) -> int:
        self._require()
        return int(self._positional.shape[0])

    @property
    def width(self) -> int:
        """D, the size of a token embedding."""
        self._require()
        return int(self._parts["token_embedding"].weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self._parts["token_embedding"].weight.dtype

    @property
    def device(self) -> torch.device:
        return self._parts["token_embedding"].weight.device

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, texts) -> torch.Tensor:
        """(K, L) token ids of strings, padded to the context length."""
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (K, L, D) of token ids (K, L) (constants: no gradient to the frozen table)."""
        self._require()
        return self._parts["token_embedding"](tokens.to(self.device)).float()

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(K,) position of the end-of-text token in each row of (K, L) token ids."""
        if self.pool_type == "eos" and self.eos_id is not None:
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary

    def token_count(self, text: str) -> int:
        """Number of BPE tokens of ``text`` without the start and end tokens."""
        tokens = self.tokenize([text])[0]
        return int(self.eot_positions(tokens[None])[0]) - 1

    # -- encoding -------------------------------------------------------------------------------
    def __call__(self, embeddings: torch.Tensor, eot: torch.Tensor, *, mode: str = "auto",
                chunk_size: Optional[int] = 256, layer_prompts: Optional[TextLayerPrompts] = None) -> torch.Tensor:
        """Text features (K, E) of whole prompts given as token embeddings (K, L, D) and EOT positions (K,).

        ``mode='auto'`` cuts the sequence after the last EOT when the tower is causal. Passing embeddings of
        real tokens gives ``encode_text`` of those tokens.
        """
        self._require()
        mode = self._pick_mode(mode, prefix_len=0)
        if mode == "prefix":
            mode = "cut"
        lp = self._check_layer_prompts(layer_prompts)
        return self._run_rows(embeddings, eot.to(embeddings.device), mode, chunk_size, lp)

    def encode_prompts(self, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor, *,
                       mode: str = "auto", chunk_size: Optional[int] = 256,
                       layer_prompts: Optional[TextLayerPrompts] = None) -> torch.Tensor:
        """Text features of prompts made of a prefix and a suffix.

        Args:
            prefix: (P, D) shared by all prompts, or (G, P, D) one per group.
            suffix: (K, S, D) shared by the groups, or (G, K, S, D). P + S is at most the context length;
                give the whole padded tail (P + S = 77) so that the plain path is CLIP's own computation.
            eot: (K,) or (G, K) EOT positions in the whole sequence (so P <= eot < P + S).
            mode: ``auto`` (prefix when the tower is causal and P > 1, else plain), ``plain``, ``cut``, ``prefix``.
            layer_prompts: deep prompts replacing positions ``start..`` before chosen blocks
                (:class:`~vlprompt.backbone.patches.TextLayerPrompts`; (P, D), or (G, P, D) per group); every path
                honours them; the prefix path when they fall inside the prefix (else ``auto`` cuts instead).
        Returns:
            (K, E) for a shared prefix, (G, K, E) for a grouped one.
        """
        self._require()
        lp = self._check_layer_prompts(layer_prompts)
        if self._class_sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            out = self._encode_sharded(prefix, suffix, eot, mode, chunk_size, lp)
            if out is not None:
                return out
        return self._encode_local(prefix, suffix, eot, mode, chunk_size, lp)

    def _check_layer_prompts(self, lp: Optional[TextLayerPrompts]) -> Optional[TextLayerPrompts]:
        if lp is None or not lp.layers:
            return None
        if not self._blocks:
            raise BackboneError("per-layer text prompts need the text tower's residual blocks")
        return lp.check(len(self._blocks), self.width)

    # -- class sharding over ranks ----------------------------------------------------------------------
    @contextlib.contextmanager
    def class_sharded(self, enabled: bool = True):
        """Within this block, with several ranks, :meth:`encode_prompts` splits the prompts over the ranks (see
        the module doc). Every rank must make the same calls in the same order (each call runs collectives).
        Prompts that differ between ranks (CoCoOp's are conditioned on each rank's images) are detected by a
        fingerprint exchanged first, and then encoded whole on each rank."""
        previous = self._class_sharded
        self._class_sharded = bool(enabled)
        try:
            yield self
        finally:
            self._class_sharded = previous

    @staticmethod
    def _fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
        """(7 per tensor,) float64: the shape (padded to 4 dims) and three sums (plain, L2 norm, position
        weighted): equal on two ranks only when the tensors are (for any practical purpose) equal."""
        rows = []
        for t in tensors:
            t = t.detach()
            shape = list(t.shape) + [-1] * (4 - t.dim())
            with torch.autocast(device_type=t.device.type, enabled=False):
                x = t.double() if not t.is_floating_point() else t
                flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
                w_col = torch.linspace(-1.0, 1.0, flat.shape[1], device=t.device, dtype=flat.dtype)
                w_row = torch.linspace(-1.0, 1.0, flat.shape[0], device=t.device, dtype=torch.float64)
                stats = [flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64),
                         ((flat @ w_col).double() * w_row).sum()]
            rows.append(torch.cat([torch.tensor(shape, dtype=torch.float64, device=t.device), torch.stack(stats)]))
        return torch.cat(rows)

    def _encode_sharded(self, prefix, suffix, eot, mode, chunk_size, lp=None) -> Optional[torch.Tensor]:
        """This rank's share of the prompts encoded, all shares gathered with gradients; None (encode locally)
        when the prompts differ between ranks or there are fewer prompts than ranks."""
        from torch.distributed.nn.functional import all_gather

        world, rank = dist.get_world_size(), dist.get_rank()
        mine = self._fingerprint(prefix, suffix, eot, *(lp.tensors() if lp is not None else ()))
        prints = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(prints, mine)
        k = suffix.shape[-3]
        if k < world or not all(torch.equal(p, prints[0]) for p in prints):  # the same decision on every rank
            return None
        bounds = [(q * k) // world for q in range(world + 1)]
        lo, hi = bounds[rank], bounds[rank + 1]
        part = self._encode_local(prefix, suffix[..., lo:hi, :, :], eot[..., lo:hi], mode, chunk_size, lp)
        kdim = part.dim() - 2  # (K_r, E) or (G, K_r, E)
        top = -(-k // world)
        if hi - lo < top:  # all_gather needs equal shapes: pad with zeros (no gradient flows to them)
            part = torch.cat([part, part.new_zeros(*part.shape[:kdim], top - (hi - lo), part.shape[-1])], dim=kdim)
        parts = all_gather(part.contiguous())
        return torch.cat([t.narrow(kdim, 0, bounds[q + 1] - bounds[q]) for q, t in enumerate(parts)], dim=kdim)

    def _encode_local(self, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor, mode: str,
                      chunk_size: Optional[int], lp: Optional[TextLayerPrompts] = None) -> torch.Tensor:
        grouped = prefix.dim() == 3
        prefix3 = prefix if grouped else prefix[None]
        g, p, _ = prefix3.shape
        suffix4 = suffix if suffix.dim() == 4 else suffix[None].expand(g, *suffix.shape)
        if suffix4.shape[0] != g:
            raise ValueError(f"suffix has {suffix4.shape[0]} groups, prefix {g}")
        k, s = suffix4.shape[1], suffix4.shape[2]
        if p + s > self.context_length:
            raise ValueError(f"prompt length {p}+{s} exceeds the context length {self.context_length}")
        eot2 = (eot if eot.dim() == 2 else eot[None].expand(g, k)).to(prefix.device)
        if int(eot2.min()) < p or int(eot2.max()) >= p + s:
            raise ValueError("EOT positions must fall inside the suffix")
        fits = lp is None or lp.end <= p  # deep prompts inside the shared prefix (else rows)
        if mode == "prefix" and not fits:
            raise BackboneError(f"the prefix text path needs the layer prompts inside the prefix (positions "
                                f"{lp.start}..{lp.end - 1}, the prefix has {p}); use mode auto, cut or plain")
        mode = self._pick_mode(mode, prefix_len=p if fits else 0)
        if lp is not None and any(t.dim() == 3 and t.shape[0] != g for t in lp.layers.values()):
            raise BackboneError(f"grouped layer prompts must have one group per prompt group ({g})")
        if mode == "prefix":  # the shared (K, S, D) suffix is indexed, never copied per group
            out = self._run_prefixed(prefix3, suffix if suffix.dim() == 4 else suffix[None], eot2, chunk_size, lp)
        else:
            full = torch.cat([prefix3[:, None].expand(g, k, p, prefix3.shape[-1]), suffix4], dim=2)
            out = self._run_rows(full.reshape(g * k, p + s, -1), eot2.reshape(-1), mode, chunk_size, lp)
            out = out.reshape(g, k, -1)
        return out if grouped else out[0]

    def _pick_mode(self, mode: str, prefix_len: int) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "auto":
            if not self.fast_ok:
                return "plain"
            return "prefix" if prefix_len > 1 else "cut"
        if mode in ("cut", "prefix") and not self.fast_ok:
            raise BackboneError(f"the {mode!r} text path needs a causal CLIP text transformer "
                                f"(this tower: causal={self.causal}, pool={self.pool_type})")
        return mode

    # -- plain and cut ----------------------------------------------------------------------------
    def _run_rows(self, x: torch.Tensor, eot: torch.Tensor, mode: str, chunk_size: Optional[int],
                  lp: Optional[TextLayerPrompts] = None) -> torch.Tensor:
        if mode == "cut":
            x = x[:, : max(int(eot.max()) + 1, lp.end if lp is not None else 0)]
        n = x.shape[0]
        # grouped layer prompts (G, P, D): the rows are G groups of n / G; a chunk keeps whole groups
        g = max((t.shape[0] for t in lp.layers.values() if t.dim() == 3), default=1) if lp is not None else 1
        if chunk_size is None or n <= chunk_size:
            return self._rows_forward(x, eot, lp)
        per_group = n // g
        step = max(chunk_size // per_group, 1) * per_group if g > 1 else chunk_size
        outs = []
        for i in range(0, n, step):
            xs, es = x[i:i + step], eot[i:i + step]
            chunk_lp = lp if g == 1 else TextLayerPrompts(
                {b: (t if t.dim() == 2 else t[i // per_group:(i + step) // per_group]) for b, t in lp.layers.items()},
                lp.start)
            tensors = chunk_lp.tensors() if chunk_lp is not None else []
            if torch.is_grad_enabled() and (xs.requires_grad or any(t.requires_grad for t in tensors)):
                outs.append(checkpoint(self._rows_forward_tensors, xs, es, chunk_lp, *tensors, use_reentrant=False))
            else:
                outs.append(self._rows_forward(xs, es, chunk_lp))
        return torch.cat(outs)

    def _rows_forward_tensors(self, x, eot, lp, *tensors):
        # (the layer prompts' tensors are arguments, so that checkpointing recomputes with them)
        if lp is not None:
            lp = TextLayerPrompts(dict(zip(sorted(lp.layers), tensors)), lp.start)
        return self._rows_forward(x, eot, lp)

    def _rows_forward(self, x: torch.Tensor, eot: torch.Tensor, lp: Optional[TextLayerPrompts] = None) -> torch.Tensor:
        """CLIP's own text forward on embeddings (N, L, D): open_clip's transformer and masks; with layer prompts,
        its blocks one by one with the prompt positions replaced before the chosen ones."""
        length = x.shape[1]
        with self.autocast():
            h = x + self._positional[:length].to(x.dtype)
            mask = self._attn_mask[:length, :length] if self._attn_mask is not None else None
            if lp is None:
                h = self._parts["transformer"](h, attn_mask=mask)
            else:
                groups = max((t.shape[0] for t in lp.layers.values() if t.dim() == 3), default=None)
                for i, block in enumerate(self._blocks):
                    if i in lp.layers:
                        h = replace_positions(h, lp.layers[i], lp.start, groups)
                    h = block(h, attn_mask=mask)
            pooled = self._pool(h, eot)
            return self._project(pooled)

    def _pool(self, h: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "first":
            return h[:, 0]
        if self.pool_type == "last":
            return h[:, -1]
        return h[torch.arange(h.shape[0], device=h.device), eot]

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = self._parts["ln_final"](pooled)
        proj = self._parts["text_projection"]
        if proj is None:
            out = pooled
        elif isinstance(proj, nn.Linear):
            out = proj(pooled)
        else:
            out = pooled @ proj
        return out.float()

    # -- shared prefix (key/value cache) -----------------------------------------------------------
    def _split_heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        n, length, d = t.shape
        return t.reshape(n, length, heads, d // heads).transpose(1, 2)

    def _attend(self, block: nn.Module, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
        attn = block.attn
        q = self._split_heads(h, attn.num_heads)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
        o = o.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        return attn.out_projection(o) if hasattr(attn, "out_projection") else attn.out_proj(o)

    def _qkv(self, block: nn.Module, x: torch.Tensor):
        attn = block.attn
        h = block.ln_1(x)
        if hasattr(attn, "in_projection"):  # LoRA inside the tower (vlprompt.backbone.patches.LoRAAttention)
            q, k, v = attn.in_projection(h)
        else:
            q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = attn.num_heads
        return q, self._split_heads(k, heads), self._split_heads(v, heads)

    @staticmethod
    def _residual(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + block.ls_1(attn_out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _prefix_kv(self, prefix: torch.Tensor, lp: Optional[TextLayerPrompts] = None) -> list[torch.Tensor]:
        """Keys and values of the prefix at every layer: a flat list [k0, v0, k1, v1, ...], each (G, H, P, hd);
        layer prompts replace their positions of the prefix before their blocks (one per group when grouped)."""
        x = prefix + self._positional[: prefix.shape[1]].to(prefix.dtype)
        kv = []
        for i, block in enumerate(self._blocks):
            if lp is not None and i in lp.layers:
                t = lp.layers[i]
                x = replace_positions(x, t, lp.start, t.shape[0] if t.dim() == 3 else None)
            q, k, v = self._qkv(block, x)
            kv += [k, v]
            if i + 1 < len(self._blocks):  # the last layer's prefix outputs are never read
                x = self._residual(block, x, self._attend(block, q, k, v, None, causal=True))
        return kv

    def _run_prefixed(self, prefix: torch.Tensor, suffix: torch.Tensor, eot: torch.Tensor,
                      chunk_size: Optional[int], lp: Optional[TextLayerPrompts] = None,
                      min_bucket: int = 8, min_rows: int = 256) -> torch.Tensor:
        """Prefix once per group, then the suffix rows in buckets of similar length.

        ``suffix`` is (1, K, S, D) when shared by the groups (rows index it without a per-group copy) or
        (G, K, S, D). Rows are sorted by EOT position and each bucket is cut after its own longest EOT, so
        short class names do not pay for the longest one (padding after the EOT is never needed: causal mask).
        A bucket holds at least ``min_bucket`` prompts and ``min_rows`` token rows before a longer length starts a
        new one: the GEMMs of a few dozen rows run at half the rate of a few hundred (a CoOp step, RN50 size, 1
        thread: 0.864 -> 0.835 s with Flowers102's 102 names, 8.36 -> 8.19 s with ImageNet's 1000; 512 rows was
        slower than either, the padding then costing more than the GEMMs gain).
        """
        g, k = eot.shape
        p = prefix.shape[1]
        n = g * k
        eot_rows = (eot - p).reshape(-1)
        order = torch.argsort(eot_rows, stable=True)
        lengths = (eot_rows[order] + 1).tolist()
        step = n if chunk_size is None else max(chunk_size, 1)
        buckets, start = [], 0
        for i in range(1, n + 1):  # a new bucket when the length grows and the bucket is big enough
            if i == n or i - start >= step or (lengths[i] != lengths[i - 1] and i - start >= min_bucket
                                               and (i - start) * lengths[i - 1] >= min_rows):
                buckets.append((start, i))
                start = i
        needs_grad = torch.is_grad_enabled() and (suffix.requires_grad or prefix.requires_grad)
        with self.autocast():
            kv = self._prefix_kv(prefix, lp)
            outs = []
            for a, b in buckets:
                idx = order[a:b]
                grp, cls = idx // k, idx % k
                length = lengths[b - 1]
                x = suffix[0, cls, :length] if suffix.shape[0] == 1 else suffix[grp, cls, :length]
                args = (x, eot_rows[idx], grp, p, *kv)
                if needs_grad and n > step:  # bounded memory: each chunk is recomputed in backward
                    outs.append(checkpoint(self._suffix_forward, *args, use_reentrant=False))
                else:
                    outs.append(self._suffix_forward(*args))
        out = torch.cat(outs)[torch.argsort(order)]
        return out.reshape(g, k, -1)

    def _suffix_forward(self, x: torch.Tensor, eot: torch.Tensor, group: torch.Tensor, p: int,
                        *kv: torch.Tensor) -> torch.Tensor:
        """Suffix rows (n, S, D) attending to their group's cached prefix keys/values: features (n, E)."""
        n, s, _ = x.shape
        x = x + self._positional[p:p + s].to(x.dtype)
        # suffix token i sees every prefix position and suffix positions <= i
        mask = torch.ones(s, p + s, dtype=torch.bool, device=x.device)
        mask[:, p:] = torch.tril(mask[:, p:])
        single = kv[0].shape[0] == 1
        for i, block in enumerate(self._blocks):
            q, k, v = self._qkv(block, x)
            kp, vp = kv[2 * i], kv[2 * i + 1]
            kp = kp.expand(n, *kp.shape[1:]) if single else kp[group]
            vp = vp.expand(n, *vp.shape[1:]) if single else vp[group]
            keys = torch.cat([kp.to(k.dtype), k], dim=2)
            values = torch.cat([vp.to(v.dtype), v], dim=2)
            x = self._residual(block, x, self._attend(block, q, keys, values, mask, causal=False))
        pooled = x[torch.arange(n, device=x.device), eot]
        return self._project(pooled)
