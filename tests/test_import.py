"""`vlprompt import`: runs of the original repositories (Dassl checkpoints of KaiyangZhou/CoOp and CHENGY12/PLOT,
xk-huang/OrdinalCLIP Lightning checkpoints) become ordinary run directories whose logits equal the original
computation with the same tensors; nothing in the files is ever executed (vlprompt.safe_pickle)."""
import copy
import json
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.data import load_dataset
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.methods.base import Features
from vlprompt.runs.assembly import load_method
from vlprompt.runs.importer import import_run
from vlprompt.safe_pickle import Placeholder, load_checkpoint, load_pickle
from vlprompt.testing import make_tiny_checkpoint

_tokenizer = open_clip.get_tokenizer("RN50")  # CLIP's BPE: the reference's clip.tokenize and _tokenizer.encode


@pytest.fixture(scope="module")
def model_files(tiny_dir):
    return make_tiny_checkpoint(tiny_dir, "tiny-vit")  # the files behind the tiny_vit fixture


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 8 generated images (the folder reader splits them into train / val / test)."""
    return color_folder(tmp_path_factory.mktemp("import_data") / "things", per_class=8, size=(36, 40))


@pytest.fixture(scope="module")
def classnames(folder):
    return load_dataset("folder", str(folder)).classnames


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("import_cache"))


def _request(model_files, folder, cache_dir, **method_options):
    cfg, weights = model_files
    req = {"backbone": str(cfg), "pretrained": str(weights), "cache_dir": cache_dir, "device": "cpu",
           "data": {"dataset": "folder", "root": str(folder)}}
    if method_options:
        req["method_options"] = method_options
    return req


# -- the original code, written out -----------------------------------------------------------------------
def original_prompt_buffers(model, classnames, n_ctx, prompt_prefix=None, n_sets=1):
    """KaiyangZhou/CoOp PromptLearner.__init__: token_prefix / token_suffix of ``prompt_prefix + " " + name
    + "."`` tokenized whole (PLOT repeats them for its N sets), and the tokenized prompts."""
    prompt_prefix = prompt_prefix or " ".join(["X"] * n_ctx)
    names = [n.replace("_", " ") for n in classnames]
    tokenized = torch.cat([_tokenizer(prompt_prefix + " " + n + ".") for n in names]).repeat(n_sets, 1)
    with torch.no_grad():
        emb = model.token_embedding(tokenized)
    return emb[:, :1].clone(), emb[:, 1 + n_ctx:].clone(), tokenized


def original_prompts(prefix, ctx, suffix, position, name_lens=None):
    """PromptLearner.forward: ctx (M, D) shared or (K, M, D) class-specific."""
    k, m = prefix.shape[0], ctx.shape[-2]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(k, -1, -1)
    if position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    out = []
    for i in range(k):
        nl = name_lens[i]
        if position == "middle":
            parts = [prefix[i:i + 1], ctx[i:i + 1, :m // 2], suffix[i:i + 1, :nl], ctx[i:i + 1, m // 2:],
                     suffix[i:i + 1, nl:]]
        else:
            parts = [prefix[i:i + 1], suffix[i:i + 1, :nl], ctx[i:i + 1], suffix[i:i + 1, nl:]]
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def original_text(model, prompts, tokenized):
    """TextEncoder.forward (open_clip's transformer is batch-first: no permute)."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ model.text_projection


def cosine(model, image, text):
    return model.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def features(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# -- Dassl's files ----------------------------------------------------------------------------------------
@pytest.fixture()
def dassl_module():
    """A stand-in of dassl.optim.lr_scheduler, importable while the test saves and gone when it loads."""
    names = ["dassl", "dassl.optim", "dassl.optim.lr_scheduler"]
    mods = {n: types.ModuleType(n) for n in names}

    class ConstantWarmupScheduler:
        def __init__(self, successor, warmup_epoch=1, cons_lr=1e-5):
            self.successor, self.warmup_epoch, self.cons_lr, self.last_epoch = successor, warmup_epoch, cons_lr, 0

    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    mods["dassl.optim.lr_scheduler"].ConstantWarmupScheduler = ConstantWarmupScheduler
    sys.modules.update(mods)
    yield ConstantWarmupScheduler
    for n in names:
        sys.modules.pop(n, None)


def save_dassl(run_folder: Path, state_dict: dict, epoch: int, warmup_cls=None, config: dict = None) -> Path:
    """Dassl's SimpleTrainer.save_model + utils.save_checkpoint: {state_dict, epoch + 1, optimizer, scheduler,
    val_result} with torch.save into <output>/prompt_learner/model.pth.tar-<epoch>; the scheduler's state holds
    the warm-up scheduler object and its successor (a torch scheduler with the SGD optimizer inside)."""
    folder = run_folder / "prompt_learner"
    folder.mkdir(parents=True, exist_ok=True)
    params = [torch.nn.Parameter(v.detach().float().clone()) for k, v in state_dict.items() if "token_" not in k]
    optim = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optim.step()  # momentum buffers: the optimizer's state is a defaultdict keyed by parameters
    cosine_sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=epoch)
    sched = {"successor": cosine_sched, "warmup_epoch": 1, "last_epoch": epoch}
    if warmup_cls is not None:
        sched["successor"] = warmup_cls(cosine_sched)
    state = {"state_dict": OrderedDict(state_dict), "epoch": epoch, "optimizer": optim.state_dict(),
             "scheduler": sched, "val_result": None}
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(state, path)
    if config is not None:  # Dassl's train.py prints its yacs config into log.txt
        text = "** Arguments **\nroot: data\n************\n** Config **\n************\n" + yaml.safe_dump(config) + \
               "Collecting env info ...\n** System info **\n"
        (run_folder / "log.txt").write_text(text)
    return path


def dassl_config(trainer, shots=2, seed=1, position="end", init="", n_ctx=4, section="COOP"):
    cfg = {"DATASET": {"NAME": "Things", "NUM_SHOTS": shots, "SUBSAMPLE_CLASSES": "all"}, "SEED": seed,
           "OPTIM": {"NAME": "sgd", "LR": 0.002, "MAX_EPOCH": 3, "WARMUP_EPOCH": 1, "WARMUP_CONS_LR": 1e-5},
           "TRAINER": {"NAME": trainer, section: {"N_CTX": n_ctx, "CTX_INIT": init, "CSC": False, "PREC": "fp16"}}}
    if section == "COOP":
        cfg["TRAINER"][section]["CLASS_TOKEN_POSITION"] = position
    return cfg


# -- 1. CoOp ------------------------------------------------------------------------------------------------
def test_coop_checkpoint_with_warmup_scheduler_imports_and_equals_the_original(
        tiny_vit, model_files, folder, classnames, cache_dir, tmp_path, dassl_module):
    model, d = tiny_vit.model, tiny_vit.text.width
    ctx = (torch.randn(4, d, generator=torch.Generator().manual_seed(3)) * 0.5).half()  # PREC fp16: saved fp16
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 4)
    run = tmp_path / "dassl_coop"
    save_dassl(run, {"ctx": ctx, "token_prefix": prefix.half(), "token_suffix": suffix.half()}, 3, dassl_module,
               dassl_config("CoOp"))
    for n in ("dassl", "dassl.optim", "dassl.optim.lr_scheduler"):
        sys.modules.pop(n)
    results = import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")
    assert "dassl" not in sys.modules  # nothing was imported to read the file
    assert results["imported_from"]["dtypes"]["ctx"] == "float16" and results["imported_from"]["epoch"] == 3
    assert results["config"]["data"]["shots"] == 2 and results["config"]["train"]["epochs"] == 3
    assert {"accuracy"} <= set(results["metrics"])
    for name in ("run.json", "config.yaml", "split.json", "method.json", "prompt.safetensors", "results.json"):
        assert (tmp_path / "out" / name).is_file(), name
    method, _, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    method.eval()
    image = features(5, tiny_vit.embed_dim)
    expected = cosine(model, image, original_text(model, original_prompts(prefix, ctx.float(), suffix, "end"),
                                                  tokenized))
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=image)), expected, rtol=0, atol=1e-5)


def test_class_specific_middle_context_follows_the_logged_configuration(
        tiny_vit, model_files, folder, classnames, cache_dir, tmp_path):
    model, d = tiny_vit.model, tiny_vit.text.width
    ctx = torch.randn(len(classnames), 4, d, generator=torch.Generator().manual_seed(4)) * 0.5
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 4)
    run = tmp_path / "csc"
    save_dassl(run, {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp", position="middle"))
    import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")
    method, meta, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    assert meta["config"]["csc"] and meta["config"]["class_position"] == "middle"
    method.eval()
    name_lens = [len(_tokenizer.encode(n.replace("_", " "))) for n in classnames]
    image = features(5, tiny_vit.embed_dim, seed=1)
    expected = cosine(model, image, original_text(model, original_prompts(prefix, ctx, suffix, "middle", name_lens),
                                                  tokenized))
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=image)), expected, rtol=0, atol=1e-5)


def test_word_init_counted_in_words_keeps_the_further_init_tokens_fixed(
        tiny_vit, model_files, folder, classnames, cache_dir, tmp_path):
    """CTX_INIT "itap of a": 3 learned vectors (the original's word count), its 4th token in token_suffix."""
    model, d = tiny_vit.model, tiny_vit.text.width
    init = "itap of a"
    assert len(_tokenizer.encode(init)) == 4
    ctx = torch.randn(3, d, generator=torch.Generator().manual_seed(5)) * 0.5
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 3, prompt_prefix=init)
    run = tmp_path / "words"
    save_dassl(run, {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp", init=init))
    import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")
    method, meta, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    assert meta["config"]["init_length"] == "words" and meta["config"]["n_ctx"] == 3
    method.eval()
    image = features(4, tiny_vit.embed_dim, seed=2)
    expected = cosine(model, image, original_text(model, original_prompts(prefix, ctx, suffix, "end"), tokenized))
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=image)), expected, rtol=0, atol=1e-5)


# -- 2. CoCoOp and PLOT ------------------------------------------------------------------------------------------
def test_cocoop_checkpoint_equals_the_original(tiny_vit, model_files, folder, classnames, cache_dir, tmp_path):
    model, d, e = tiny_vit.model, tiny_vit.text.width, tiny_vit.embed_dim
    g = torch.Generator().manual_seed(6)
    ctx = torch.randn(4, d, generator=g) * 0.5
    meta_net = torch.nn.Sequential(OrderedDict([("linear1", torch.nn.Linear(e, e // 16)),
                                                ("relu", torch.nn.ReLU()),
                                                ("linear2", torch.nn.Linear(e // 16, d))]))
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 4, prompt_prefix="a photo of a")
    sd = {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix,
          **{f"meta_net.{k}": v.detach() for k, v in meta_net.state_dict().items()}}
    run = tmp_path / "cocoop"
    save_dassl(run, sd, 10, config=dassl_config("CoCoOp", init="a photo of a", section="COCOOP"))
    import_run("cocoop", run, _request(model_files, folder, cache_dir), tmp_path / "out")
    method, _, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    method.eval()
    image = features(3, e, seed=3)
    imf = F.normalize(image, dim=-1)
    with torch.no_grad():
        shifted = ctx[None] + meta_net(imf)[:, None]  # CoCoOp PromptLearner.forward: ctx + bias per image
        expected = torch.stack([cosine(model, imf[b:b + 1], original_text(
            model, original_prompts(prefix, shifted[b], suffix, "end"), tokenized))[0] for b in range(3)])
        torch.testing.assert_close(method(Features(global_=image)), expected, rtol=0, atol=1e-5)


def original_sinkhorn(K, u, v, max_iter=100, thresh=1e-2):
    """CHENGY12/PLOT CustomCLIP.Sinkhorn."""
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def test_plot_prompt_sets_equal_the_original(tiny_vit, model_files, folder, classnames, cache_dir, tmp_path):
    model, d, e = tiny_vit.model, tiny_vit.text.width, tiny_vit.embed_dim
    n, k = 3, len(classnames)
    ctx = torch.randn(n, 4, d, generator=torch.Generator().manual_seed(7)) * 0.5  # PLOT: (N, n_ctx, dim)
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 4, n_sets=n)
    run = tmp_path / "plot"
    save_dassl(run, {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix}, 5)  # no log.txt: flags
    req = _request(model_files, folder, cache_dir)
    req["data"]["shots"] = 2
    import_run("plot", run, req, tmp_path / "out")
    method, meta, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    assert meta["config"]["n_prompts"] == n
    method.eval()
    b, m = 2, 6
    local = torch.randn(b, m, e, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        # PLOT PromptLearner.forward + CustomCLIP.forward (uniform marginals, eps 0.1, plan without gradient)
        flat = ctx[:, None].expand(n, k, 4, d).reshape(n * k, 4, d)  # N x K prompts, set-major
        text = original_text(model, torch.cat([prefix, flat, suffix], dim=1), tokenized).view(n, k, e)
        img = F.normalize(local.permute(1, 0, 2), dim=2)  # M x b x E
        sim = torch.einsum("mbd,ncd->mnbc", img, F.normalize(text, dim=2)).reshape(m, n, b * k).permute(2, 0, 1)
        plan = original_sinkhorn(torch.exp(-(1.0 - sim) / 0.1), torch.full((b * k, m), 1.0 / m),
                                 torch.full((b * k, n), 1.0 / n))
        expected = model.logit_scale.exp() * torch.sum(plan * sim, dim=(1, 2)).view(b, k)
        got = method(Features(global_=torch.randn(b, e), local=local))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# -- 3. OrdinalCLIP --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("import_ranks") / "ages"
    rng = np.random.default_rng(1)
    for age in ("20", "30", "40", "50", "60"):
        (root / age).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / age / f"{i}.jpg")
    return root


def test_ordinalclip_lightning_checkpoint_equals_the_original(tiny_vit, model_files, ranks_folder, cache_dir,
                                                              tmp_path):
    model, d = tiny_vit.model, tiny_vit.text.width
    r, n_ctx, n_base = 5, 3, 3
    g = torch.Generator().manual_seed(9)
    context = torch.randn(n_ctx, d, generator=g) * 0.5
    rank_embeds = torch.randn(n_base, 1, d, generator=g) * 0.5
    visual = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in model.visual.state_dict().items()}  # a trained image encoder: not the backbone's
    text = {k: v for k, v in model.state_dict().items() if k.startswith(("transformer.", "ln_final.")) or
            k in ("positional_embedding", "text_projection")}
    sd = OrderedDict({"module.prompt_learner.context_embeds": context, "module.prompt_learner.rank_embeds": rank_embeds,
                      **{f"module.image_encoder.{k}": v for k, v in visual.items()},
                      **{f"module.text_encoder.{k}": v for k, v in text.items()},
                      "module.logit_scale": model.logit_scale.detach().clone()})
    ckpt_dir = tmp_path / "ordinal" / "ckpts"
    ckpt_dir.mkdir(parents=True)
    torch.save({"epoch": 9, "global_step": 40, "pytorch-lightning_version": "1.6.5", "state_dict": sd,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
                "lr_schedulers": [{"last_epoch": 9, "base_lrs": [1e-4]}],
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(3.2), "dirpath": "ckpts"}}},
               ckpt_dir / "epoch=9.ckpt")
    (tmp_path / "ordinal" / "config.yaml").write_text(yaml.safe_dump({"runner_cfg": {"seed": 1, "model_cfg": {
        "type": "OrdinalCLIP", "text_encoder_name": "RN50", "image_encoder_name": "RN50",
        "prompt_learner_cfg": {"type": "RankPromptLearner", "num_ranks": r, "num_base_ranks": n_base,
                               "num_tokens_per_rank": 1, "num_context_tokens": n_ctx, "rank_tokens_position": "tail",
                               "init_context": None, "rank_specific_context": False,
                               "interpolation_type": "linear"}}}}))
    req = _request(model_files, ranks_folder, cache_dir)
    req["data"]["shots"] = 0
    results = import_run("ordinalclip", ckpt_dir / "epoch=9.ckpt", req, tmp_path / "out")
    assert "mae_expectation" in json.dumps(results["metrics"])
    method, _, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    method.eval()
    images = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        # RankPromptLearner: linear interpolation weights over linspace(0, R-1, B), rows normalised
        w = 1.0 - (torch.arange(r)[:, None].float() - torch.linspace(0, r - 1, n_base)[None]).abs() / (r - 1)
        w = w / w.sum(-1, keepdim=True)
        ranks = torch.sum(w[..., None, None] * rank_embeds[None], dim=1)  # (R, 1, D)
        length = 1 + n_ctx + 1 + 1 + 1
        tokens = torch.zeros(r, 77, dtype=torch.long)
        tokens[:, :length] = torch.arange(length)
        emb = model.token_embedding(torch.tensor([0, 49406, 49407, 269]))
        sent = emb[0][None, None].repeat(r, 77, 1)
        sent[:, 0], sent[:, length - 1], sent[:, length - 2] = emb[1], emb[2], emb[3]
        sent[:, 1:1 + n_ctx + 1] = torch.cat([context[None].expand(r, -1, -1), ranks], dim=1)
        text_features = original_text(model, sent, tokens)
        trained = copy.deepcopy(model.visual)
        trained.load_state_dict(visual)
        expected = cosine(model, trained(images), text_features)
        torch.testing.assert_close(method(Features(images=images)), expected, rtol=0, atol=1e-5)


# -- 4. refusals -------------------------------------------------------------------------------------------------
class _Calls:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func, name", [(os.system, "posix.system"), (open, "io.open")])
def test_a_pickle_that_would_call_a_function_is_refused_without_calling_it(tiny_vit, tmp_path, func, name):
    marker = tmp_path / "marker"
    args = (f"touch {marker}",) if func is os.system else (str(marker), "w")
    d = tiny_vit.text.width
    path = save_dassl(tmp_path / "evil", {"ctx": torch.zeros(4, d)}, 1)
    state = torch.load(path, weights_only=False)
    state["scheduler"]["hook"] = _Calls(func, *args)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*{name}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=name):
        import_run("coop", tmp_path / "evil", {}, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    plain = tmp_path / "split.pkl"  # Dassl's split_fewshot pickles go through the same refusal
    plain.write_bytes(pickle.dumps({"train": [_Calls(func, *args)]}, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(CheckpointError, match=name):
        load_pickle(plain)
    assert not marker.exists()


def test_placeholders_record_state_without_running_code(tmp_path, dassl_module):
    path = save_dassl(tmp_path / "r", {"ctx": torch.zeros(2, 8)}, 2, dassl_module)
    for n in ("dassl", "dassl.optim", "dassl.optim.lr_scheduler"):
        sys.modules.pop(n)
    sched = load_checkpoint(path)["scheduler"]
    warm = sched["successor"]
    assert isinstance(warm, Placeholder) and warm.global_name == "dassl.optim.lr_scheduler.ConstantWarmupScheduler"
    assert warm.attrs["warmup_epoch"] == 1
    cos = warm.attrs["successor"]
    assert cos.global_name == "torch.optim.lr_scheduler.CosineAnnealingLR" and cos.attrs["T_max"] == 2


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny_vit, model_files, folder, classnames, cache_dir,
                                                         tmp_path):
    d = tiny_vit.text.width
    prefix, suffix, _ = original_prompt_buffers(tiny_vit.model, classnames, 4)
    run = tmp_path / "coop"
    save_dassl(run, {"ctx": torch.zeros(4, d), "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp"))
    with pytest.raises(CheckpointError, match=rf"tensor ctx has shape \(4, {d}\).*expects \(1, 1, 6, {d}\)"):
        import_run("coop", run, _request(model_files, folder, cache_dir, n_ctx=6), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_another_class_order_is_refused_by_the_saved_class_tokens(tiny_vit, model_files, folder, classnames,
                                                                  cache_dir, tmp_path):
    d = tiny_vit.text.width
    prefix, suffix, _ = original_prompt_buffers(tiny_vit.model, list(reversed(classnames)), 4)
    run = tmp_path / "coop"
    save_dassl(run, {"ctx": torch.zeros(4, d), "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp"))
    with pytest.raises(CheckpointError, match="class 0 .*another class list or order"):
        import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")


def test_coop_without_its_configuration_needs_the_class_position(tiny_vit, model_files, folder, cache_dir, tmp_path):
    run = tmp_path / "coop"
    save_dassl(run, {"ctx": torch.zeros(4, tiny_vit.text.width)}, 3)
    with pytest.raises(ConfigError, match="--class-position"):
        import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")


def test_class_specific_context_on_another_number_of_classes_names_both(tiny_vit, model_files, folder, cache_dir,
                                                                        tmp_path):
    ctx = torch.randn(5, 4, tiny_vit.text.width)  # learned for 5 classes; the data has 3
    run = tmp_path / "csc"
    save_dassl(run, {"ctx": ctx}, 3, config=dassl_config("CoOp"))
    with pytest.raises(CheckpointError, match=r"a class-specific context learned for 5 classes, but folder "
                                              r"\(--classes all\) has 3: import it onto the classes it was trained on"):
        import_run("coop", run, _request(model_files, folder, cache_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def test_only(folder, tmp_path_factory):
    """The test images of ``folder`` (its classes) in a folder that has only test/: e.g. a benchmark's test set."""
    import shutil

    root = tmp_path_factory.mktemp("import_test_only") / "bench"
    for sample in load_dataset("folder", str(folder)).test:
        dest = root / "test" / Path(sample.path).parent.name / Path(sample.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, dest)
    return root


def test_import_onto_test_only_data_keeps_the_runs_shots(tiny_vit, model_files, folder, test_only, classnames,
                                                         cache_dir, tmp_path):
    prefix, suffix, _ = original_prompt_buffers(tiny_vit.model, classnames, 4)
    run = tmp_path / "dassl"
    save_dassl(run, {"ctx": torch.randn(4, tiny_vit.text.width), "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp", shots=16))
    results = import_run("coop", run, _request(model_files, test_only, cache_dir), tmp_path / "out")
    assert results["shots"] == 16 and results["config"]["data"]["shots"] == 16  # tables file it under 16 shots
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert split["train"] == [] and len(split["test"]) == len(load_dataset("folder", str(folder)).test)
    assert "has no training images" in (tmp_path / "out" / "log.txt").read_text()
    req = _request(model_files, test_only, cache_dir)
    req["data"]["shots"] = 0  # the earlier workaround for the missing train/ folder: a wrong record
    with pytest.raises(ConfigError, match=r"--shots 0 contradicts the imported run, trained on 16 shots per class "
                                          r"\(.*log\.txt\)"):
        import_run("coop", run, req, tmp_path / "out0")


def test_unknown_shots_must_be_given(tiny_vit, model_files, folder, cache_dir, tmp_path):
    run = tmp_path / "coop"
    save_dassl(run, {"ctx": torch.zeros(4, tiny_vit.text.width)}, 3)  # no log.txt: shots unknown
    req = _request(model_files, folder, cache_dir, class_position="end")
    with pytest.raises(ConfigError, match=r"says the run's shots: give --shots \(the training images per class"):
        import_run("coop", run, req, tmp_path / "out")
    req["data"]["shots"] = 2
    assert import_run("coop", run, req, tmp_path / "out")["shots"] == 2


def test_word_init_given_as_a_flag_is_counted_in_words_as_the_original(tiny_vit, model_files, folder, classnames,
                                                                       cache_dir, tmp_path):
    """A CoOp run initialised from "itap of a" imported without its log.txt: --init says the init, and the
    original's word count (3 learned vectors) applies without --init-length."""
    model, d = tiny_vit.model, tiny_vit.text.width
    init = "itap of a"
    ctx = torch.randn(3, d, generator=torch.Generator().manual_seed(11)) * 0.5
    prefix, suffix, tokenized = original_prompt_buffers(model, classnames, 3, prompt_prefix=init)
    run = tmp_path / "words"
    save_dassl(run, {"ctx": ctx, "token_prefix": prefix, "token_suffix": suffix}, 3)  # no log.txt
    req = _request(model_files, folder, cache_dir, init=init, class_position="end")
    req["data"]["shots"] = 2
    import_run("coop", run, req, tmp_path / "out")
    method, meta, _ = load_method(tmp_path / "out", backbone=tiny_vit)
    assert meta["config"]["init_length"] == "words" and meta["config"]["n_ctx"] == 3
    method.eval()
    image = features(4, tiny_vit.embed_dim, seed=12)
    expected = cosine(model, image, original_text(model, original_prompts(prefix, ctx, suffix, "end"), tokenized))
    with torch.no_grad():
        torch.testing.assert_close(method(Features(global_=image)), expected, rtol=0, atol=1e-5)
    req["method_options"]["init_length"] = "tokens"  # said explicitly: 4 token vectors, which ctx (3) does not fit
    with pytest.raises(ConfigError, match=r"'itap of a' is 4 tokens \(init_length=tokens\)"):
        import_run("coop", run, req, tmp_path / "tokens")


# -- 5. the command line, and the commands that read a run ------------------------------------------------------
def test_imported_run_works_with_eval_export_predict_interpret(tiny_vit, model_files, folder, classnames,
                                                               cache_dir, tmp_path, capsys):
    d = tiny_vit.text.width
    prefix, suffix, _ = original_prompt_buffers(tiny_vit.model, classnames, 4)
    run = tmp_path / "dassl"
    save_dassl(run, {"ctx": torch.randn(4, d), "token_prefix": prefix, "token_suffix": suffix}, 3,
               config=dassl_config("CoOp"))
    cfg, weights = model_files
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
              "--cache-dir", cache_dir, "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main(["import", str(run), "--from", "coop", "--output", str(out), *common]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert imported["imported_from"]["format"] == "dassl"
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(folder), "--cache-dir", cache_dir,
                 "--device", "cpu", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == imported["metrics"]["accuracy"]
    assert main(["export", str(out), "--quiet"]) == 0
    image = next(iter(sorted(folder.rglob("*.jpg"))))
    assert main(["predict", str(out / "export"), str(image), "--json", "--quiet", "--device", "cpu"]) == 0
    assert main(["interpret", str(out), "--json", "--quiet"]) == 0
    capsys.readouterr()
    # importing the same file again into the same directory returns the run it holds
    (out / "results.json").write_text(json.dumps({**imported, "marker": 1}))
    assert main(["import", str(run), "--from", "coop", "--output", str(out), *common]) == 0
    assert json.loads(capsys.readouterr().out)["marker"] == 1
