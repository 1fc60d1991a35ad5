"""Learned context vectors placed around class names: the prompt layout shared by CoOp, CoCoOp, PLOT, KgCoOp
and ProGrad (:class:`PromptContext`), :class:`ContextPromptMethod`, the base of the methods that learn one, and
:class:`ContextClassifier`, the base of those whose K class prompts classify by cosine (CoOp, KgCoOp, ProGrad).

A prompt is ``<sot> ctx_1 .. ctx_M <class name> . <eot> <pad>..`` (class token at the end), or with the class
name in the middle (context split at M // 2) or at the front. The learned context is stored without the class
list: the class-dependent token embeddings (class names, ".", end token, padding) are non-persistent buffers
rebuilt from class names, so a context trained on one class list loads onto another (base-to-new,
cross-dataset, ImageNet to its variants) -- except class-specific contexts (CSC), which belong to their classes
and refuse any other class list.

The token layout is the reference's (KaiyangZhou/CoOp ``PromptLearner``): the sentence
``"<ctx words> {name}."`` is tokenized whole, and for the middle / front positions the class block is the first
``len(encode(name))`` tokens after the context (the name encoded alone). CLIP's BPE merges a trailing
punctuation run with the full stop (``"cup (drinking)."`` ends in the token ``")."``), so the block is not
"the sentence's tokens minus the full stop": it is cut exactly where the reference cuts it.

A word init learns one vector per BPE token by default (``init_length="tokens"``). The reference counts words
instead (``n_ctx = len(ctx_init.split(" "))``): it learns the first ``n_ctx`` token vectors of the init and
tokenizes ``"<init> {name}."`` whole, so an init with more tokens than words ("itap of a": 3 words, 4 tokens)
keeps its further tokens fixed, before the class name. ``init_length="words"`` does exactly that (the imported
original checkpoints need it); where every word is one token the two are the same prompt. The same rule with the
count given, ``init_length="n_ctx"``, is the one of IVLP, MaPLe and PromptSRC
(muzairkhattak/multimodal-prompt-learning ``trainers/maple.py`` l.84-97, ``independentVL.py`` l.82-95): the first
``n_ctx`` token vectors of the init are learned and the sentence ``"<init> {name}."`` is tokenized whole, so with
2 vectors and "a photo of a", "a photo" is learned and "of a" stays a fixed part of every prompt. (The originals
learn the end-of-text and padding embeddings when ``n_ctx`` exceeds the init's tokens, and silently drop the init
when ``n_ctx > 4``: the first is refused here, the second honoured.)

Where the words go (``init_placement``): ``start`` -- the context is exactly the init's vectors (CoOp; ``n_ctx``, if
given, must be their number); ``end`` -- a context of ``n_ctx`` vectors whose last ones are the init's and whose
first ones are zeros (ProGrad, BeierZhu/Prompt-align ``trainers/prograd.py:78-95``: the template phrase in the last
p of 16 slots). The prompt text is then ``"X" * (n_ctx - p) + init``, so with ``init_length="words"`` the init's
tokens beyond its p words stay fixed right after the context, as in ProGrad (its "a type of pet, a photo of a":
8 words, 9 tokens).
"""
from __future__ import annotations

from enum import Enum
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, VLPromptError
from ..base import Features, Method, cosine_logits, first_difference
from .options import INIT_LENGTHS, INIT_PLACEMENTS, clean_init_words

DEFAULT_N_CTX = 16  # context vectors of a random init when n_ctx is not given (CoOp's and PLOT's papers)


class ClassTokenPosition(str, Enum):
    END = "end"
    MIDDLE = "middle"
    FRONT = "front"


def clean_classname(name) -> str:
    """The form a class name takes in a prompt (the reference: ``name.replace("_", " ")``)."""
    return str(name).replace("_", " ").strip()


def _tokenize_flagging_overflow(tokenizer, texts: Sequence[str], context_length: int):
    """Token ids (K, context_length) and a (K,) bool tensor: which texts need more than ``context_length``
    tokens (start + BPE + end). open_clip's tokenizers truncate silently, so each text is tokenized one slot
    longer: a text fits exactly when that extra slot holds padding (the padding of an empty text)."""
    rows = tokenizer(list(texts) + [""], context_length=context_length + 1)
    pad = rows[-1, -1]
    return rows[:-1, :context_length], rows[:-1, -1] != pad


def _token_count(tokenizer, text: str) -> Optional[int]:
    encode = getattr(tokenizer, "encode", None)  # open_clip's SimpleTokenizer: BPE ids without start / end
    return len(encode(text)) + 2 if callable(encode) else None


def check_prompts_fit(tokenizer, texts: Sequence[str], context_length: int, what: str = "prompt",
                      names: Optional[Sequence[str]] = None) -> None:
    """Raise VLPromptError naming the first text whose tokens (start + BPE + end) exceed ``context_length``;
    ``names`` (K,): the class name each text was made from, named first.

    open_clip's tokenizers cut such a text silently (the class name loses its end, the features change)."""
    texts = list(texts)
    if not texts:
        return
    _, overflow = _tokenize_flagging_overflow(tokenizer, texts, context_length)
    if bool(overflow.any()):
        i = int(overflow.nonzero()[0, 0])
        n = _token_count(tokenizer, texts[i])
        count = f"{n} tokens" if n is not None else "more tokens"
        if names is not None:
            raise VLPromptError(f"class name {names[i]!r} does not fit the text tower's context length: its {what} "
                                f"needs {count} with the start and end tokens, at most {context_length}; shorten "
                                f"the name")
        raise VLPromptError(f"{what} {texts[i]!r} does not fit the text tower's context length: {count} with the "
                            f"start and end tokens, at most {context_length}")


class PromptContext(nn.Module):
    """Learned context and the class-dependent prompt layout.

    Parameters: ``ctx`` of shape (N, C, M, D): N prompt sets (PLOT's N prompts per class; 1 for CoOp), C = 1
    for a context shared by all classes or C = K for class-specific contexts, M context vectors of width D.

    ``encode(shift=None)`` returns text features (G, K, E) with G = N, or G = B when an image-conditioned
    ``shift`` (B, D) is added to every context vector (CoCoOp; N must be 1).
    """

    def __init__(self, text_encoder, classnames: Sequence[str], *, n_ctx: Optional[int] = None, csc: bool = False,
                 position: str | ClassTokenPosition = ClassTokenPosition.END, init_words: Optional[str] = None,
                 n_prompts: int = 1, init_std: float = 0.02, text_mode: str = "auto",
                 chunk_size: Optional[int] = 256, init_length: str = "tokens", init_placement: str = "start"):
        super().__init__()
        self.text = text_encoder
        self.position = ClassTokenPosition(position)
        self.csc = bool(csc)
        self.n_prompts = int(n_prompts)
        self.text_mode = text_mode
        self.chunk_size = chunk_size
        self.init_words = clean_init_words(init_words)
        dim = text_encoder.width
        if self.n_prompts < 1:
            raise VLPromptError(f"n_prompts must be >= 1, got {n_prompts}")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int)):
            raise ConfigError(f"n_ctx (--n-ctx) must be an integer, got {n_ctx!r}")
        if init_length not in INIT_LENGTHS:
            raise ConfigError(f"init_length (--init-length) must be one of {', '.join(INIT_LENGTHS)}, got "
                              f"{init_length!r}")
        if init_length == "words" and self.init_words is None:
            raise ConfigError("init_length (--init-length) = words counts the words of a word init: give --init")
        if init_placement not in INIT_PLACEMENTS:
            raise ConfigError(f"init_placement (--init-placement) must be one of {', '.join(INIT_PLACEMENTS)}, got "
                              f"{init_placement!r}")
        if init_placement == "end" and self.init_words is None:
            raise ConfigError("init_placement (--init-placement) = end places the words of a word init: give --init")
        self.init_length = init_length
        self.init_placement = init_placement
        self.n_init = 0  # context vectors initialised from the init's words (the last ones with placement end)
        if self.init_words is not None:
            check_prompts_fit(text_encoder.tokenizer, [self.init_words], text_encoder.context_length,
                              what="init (--init) words")
            tokens = text_encoder.tokenize([self.init_words])
            n_tokens = int(text_encoder.eot_positions(tokens)[0]) - 1
            if init_length == "words":  # the reference's count; the init's further tokens stay fixed
                n_words, unit = len(self.init_words.split(" ")), "words"
                if n_words > n_tokens:  # e.g. a double space: the reference would learn <eot> and padding
                    raise ConfigError(f"init (--init) {self.init_words!r} has {n_words} space-separated words but "
                                      f"{n_tokens} tokens; remove the repeated spaces")
            elif init_length == "n_ctx":  # the count given: its first tokens learned, the others stay fixed
                if n_ctx is None:
                    raise ConfigError("init_length (--init-length) = n_ctx learns the first --n-ctx tokens of "
                                      "--init: give --n-ctx")
                if n_ctx > n_tokens:  # the originals would learn the <eot> and padding embeddings
                    raise ConfigError(f"n_ctx (--n-ctx) = {n_ctx} but init (--init) {self.init_words!r} has "
                                      f"{n_tokens} tokens: with init_length=n_ctx the first n_ctx tokens of the "
                                      f"init are learned; give at most {n_tokens} or a longer init")
                n_words, unit = n_ctx, "tokens"
            else:  # their BPE tokens, one vector each
                n_words, unit = n_tokens, "tokens"
            if init_placement == "end":  # zeros, then the words (ProGrad)
                if n_ctx is None or n_ctx < n_words:
                    raise ConfigError(f"init_placement (--init-placement) = end puts init (--init) "
                                      f"{self.init_words!r} ({n_words} {unit}) at the end of a context of n_ctx "
                                      f"vectors: give --n-ctx {n_words} or more" + ("" if n_ctx is None else
                                                                                 f" (got {n_ctx})"))
            else:
                if n_ctx is not None and n_ctx != n_words:
                    raise ConfigError(f"n_ctx (--n-ctx) = {n_ctx} but init (--init) {self.init_words!r} is {n_words} "
                                      f"{unit} (init_length={init_length}): drop n_ctx or set it to {n_words}, or "
                                      f"pad it with zeros before the words (--init-placement end)")
                n_ctx = n_words
            self.n_init = n_words
            words = text_encoder.embed(tokens)[0, 1:1 + n_words]  # (p, D)
        elif n_ctx is None:
            n_ctx = DEFAULT_N_CTX
        if n_ctx < 1:
            raise ConfigError(f"the context needs at least one vector (n_ctx={n_ctx})")
        self.n_ctx = int(n_ctx)
        # a class-specific context belongs to the class list it was built for (kept by the caller's class list:
        # the runner rebuilds a saved method on its training classes, then moves it with set_classnames)
        self.csc_classnames = [clean_classname(c) for c in classnames] if self.csc else None
        n_cls_ctx = len(classnames) if self.csc else 1
        ctx = torch.empty(self.n_prompts, n_cls_ctx, self.n_ctx, dim)
        g = torch.Generator().manual_seed(0)
        if self.init_words is None:
            nn.init.normal_(ctx, std=init_std)
        else:
            ctx.zero_()
            ctx[..., self.n_ctx - self.n_init:, :] = words
            if self.n_prompts > 1:  # identical prompts would receive identical updates forever
                ctx[1:] += torch.randn(ctx[1:].shape, generator=g) * init_std
        self.ctx = nn.Parameter(ctx.to(text_encoder.device))
        self.set_classnames(classnames)

    # -- class-dependent buffers ------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent token embeddings for a (possibly new) class list.

        A class-specific context accepts only the class list it was built for (same names, same order)."""
        classnames = [clean_classname(c) for c in classnames]
        if not classnames:
            raise VLPromptError("the class list is empty")
        if "" in classnames:
            raise VLPromptError(f"class {classnames.index('')} has an empty name")
        if self.csc and classnames != self.csc_classnames:
            diff = first_difference(self.csc_classnames, classnames)
            raise VLPromptError(f"this context is class-specific: it belongs to the {len(self.csc_classnames)} "
                                f"classes it was trained on and cannot be used for another class list ({diff}); "
                                f"train a unified context (no --csc) to move prompts between class lists")
        te = self.text
        m = self.n_ctx
        length = te.context_length
        if self.init_length in ("words", "n_ctx") and self.init_words is not None:
            # the reference's sentence: the init's tokens beyond the m learned ones stay in the fixed tail (placement
            # end: "X" for each zero vector before the words, as ProGrad writes it)
            placeholder = " ".join(["X"] * (m - self.n_init) + [self.init_words])
        else:
            placeholder = " ".join(["X"] * m)  # "X" is one token; the reference writes the init words there
            # instead, which gives the same tokens after the context when each is one token (the name follows
            # a space)
        tokens, overflow = _tokenize_flagging_overflow(te.tokenizer, [f"{placeholder} {n}." for n in classnames],
                                                       length)
        if bool(overflow.any()):
            name = classnames[int(overflow.nonzero()[0, 0])]
            n = _token_count(te.tokenizer, f"{placeholder} {name}.")
            raise VLPromptError(f"class name {name!r} is too long for the context length {length} with {m} "
                                f"context vectors" + (f" ({n} tokens with the start, end and '.' tokens)" if n else ""))
        tokens = tokens.to(te.device)
        eot = te.eot_positions(tokens)
        emb = te.embed(tokens)  # (K, L, D)
        # the reference's name_lens: the name encoded alone (no start / end token), cut off the sentence's tokens
        # after the context. It can exceed the tokens before <eot> when the merge with "." shortens the name's
        # last BPE run (e.g. "x(.." is 3 tokens, "x(..." 2): the reference would then move <eot> into the
        # class block and pool another token; here the block stops before <eot>.
        names = te.tokenizer(classnames, context_length=length).to(te.device)
        name_lens = torch.minimum(te.eot_positions(names) - 1, eot - 1 - m)
        self.classnames = list(classnames)
        self.register_buffer("sot", emb[0, :1].clone(), persistent=False)  # (1, D)
        self.register_buffer("tail", emb[:, 1 + m:].clone(), persistent=False)  # (K, L-1-M, D)
        self.register_buffer("eot", eot.clone(), persistent=False)  # (K,)
        self.register_buffer("name_lens", name_lens, persistent=False)
        self.register_buffer("index", self._layout_index(name_lens, emb.shape[1] - 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _layout_index(self, name_lens: torch.Tensor, length: int) -> torch.Tensor:
        """(K, length) gather index into ``cat([ctx (M rows), tail (length - M rows)])`` per class, giving the
        token sequence after <sot> for the chosen class-token position."""
        m = self.n_ctx
        j = torch.arange(length)[None].expand(len(name_lens), -1)
        nl = name_lens[:, None].cpu()
        if self.position is ClassTokenPosition.END:
            return j.clone()
        h = m // 2 if self.position is ClassTokenPosition.MIDDLE else 0
        # [ctx[:h], name, ctx[h:], rest]  (front: h = 0)
        idx = torch.where(j < h, j,
              torch.where(j < h + nl, m + (j - h),
              torch.where(j < m + nl, h + (j - h - nl), j)))
        return idx

    @property
    def shared_len(self) -> int:
        """Context vectors right after <sot> that are the same for every class (the shared prefix)."""
        if self.csc:
            return 0
        return {ClassTokenPosition.END: self.n_ctx, ClassTokenPosition.MIDDLE: self.n_ctx // 2,
                ClassTokenPosition.FRONT: 0}[self.position]

    # -- prompts --------------------------------------------------------------------------------
    def prompt_embeddings(self, shift: Optional[torch.Tensor] = None):
        """Prefix (G, P, D) and suffix ((K, S, D) or (G, K, S, D)) of every prompt, and the EOT positions."""
        ctx = self.ctx  # (N, C, M, D)
        if shift is not None:
            if self.n_prompts != 1:
                raise VLPromptError("an image-conditioned context needs a single prompt set")
            ctx = ctx[0][None] + shift[:, None, None, :]  # (B, C, M, D)
        g, c, m, d = ctx.shape
        k = self.num_classes
        p = self.shared_len
        prefix = torch.cat([self.sot.expand(g, 1, d), ctx[:, 0, :p]], dim=1)  # (G, 1 + p, D)
        if self.position is ClassTokenPosition.END and not self.csc:
            return prefix, self.tail, self.eot
        table = torch.cat([ctx.expand(g, k, m, d), self.tail.expand(g, k, *self.tail.shape[1:])], dim=2)
        idx = self.index[None, :, :, None].expand(g, k, self.index.shape[1], d)
        seq = table.gather(2, idx)  # (G, K, L-1, D)
        return prefix, seq[:, :, p:], self.eot

    def encode(self, shift: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
               layer_prompts=None) -> torch.Tensor:
        """Text features (G, K, E), not normalised. ``layer_prompts``: deep prompts replacing positions after the
        start token in deeper blocks (:class:`~vlprompt.backbone.patches.TextLayerPrompts`)."""
        prefix, suffix, eot = self.prompt_embeddings(shift)
        return self.text.encode_prompts(prefix, suffix, eot, mode=self.text_mode,
                                        chunk_size=chunk_size or self.chunk_size, layer_prompts=layer_prompts)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """Each learned context block: ({"prompt": n, "class": class name or None}, its (M, D) vectors)."""
        ctx = self.ctx.detach()
        return [({"prompt": n, "class": self.csc_classnames[c] if self.csc else None}, ctx[n, c])
                for n in range(ctx.shape[0]) for c in range(ctx.shape[1])]

    def full_embeddings(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole token sequences (G, K, L, D) as the reference builds them (for tests and interpretation)."""
        prefix, suffix, _ = self.prompt_embeddings(shift)
        g = prefix.shape[0]
        if suffix.dim() == 3:
            suffix = suffix[None].expand(g, *suffix.shape)
        return torch.cat([prefix[:, None].expand(g, suffix.shape[1], *prefix.shape[1:]), suffix], dim=2)


class ContextPromptMethod(Method):
    """Base of the methods that learn a context (:class:`PromptContext`) from a :class:`.options.ContextOptions`
    config: builds ``self.prompt`` (``n_prompts`` prompt sets; class-specific when the config says ``csc``), records
    the number of context vectors actually learned in ``self.config`` (a word init decides it), moves the prompts
    to other class lists and exposes the learned vectors to ``vlprompt interpret``."""

    def __init__(self, config, backbone, classnames: Sequence[str], *, n_prompts: int = 1,
                 chunk_size: Optional[int] = None):
        import dataclasses

        super().__init__(config, backbone, classnames)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, csc=getattr(config, "csc", False),
                                    position=config.class_position, init_words=config.init, n_prompts=n_prompts,
                                    init_std=config.init_std, text_mode=config.text_mode,
                                    chunk_size=getattr(config, "chunk_size", chunk_size),
                                    **config.word_init_rule())
        # record what was learned (method.json / config.yaml write this config); the caller's object is left alone
        self.config = dataclasses.replace(config, n_ctx=self.prompt.n_ctx)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt.set_classnames(classnames)  # first: a refused class list leaves the method unchanged
        super().set_classnames(classnames)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """({"prompt": n, "class": class name or None}, (M, D) context vectors) per learned context block."""
        return self.prompt.interpretable_vectors()


class ContextClassifier(ContextPromptMethod):
    """A learned context whose K class prompts give the class text features that classify images by cosine: CoOp,
    and the methods that only change how it is trained (KgCoOp's loss, ProGrad's gradient). Evaluation encodes the
    prompts once; the export is a linear head (the normalised class text features)."""

    def text_features(self) -> torch.Tensor:
        """(K, E) class text features, not normalised; computed once per evaluation."""
        return self.once_per_eval(lambda: self.prompt.encode()[0])

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_, self.text_features(), self.logit_scale)

    def export_head(self):
        with torch.no_grad():
            text = F.normalize(self.prompt.encode()[0].float(), dim=-1)
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale}
