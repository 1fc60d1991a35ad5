"""The paper recipes every method resolves to by default, field by field, each value with its source.

Sources are the original repositories (read at the commits the references were taken from):
- CoOp/CoCoOp: KaiyangZhou/CoOp (1fbb1a6) on Dassl.pytorch (``dassl/config/defaults.py``);
- PLOT: CHENGY12/PLOT, ``plot-coop/`` (1518514);
- OrdinalCLIP: xk-huang/OrdinalCLIP (eaca1ce), ``configs/meta_cfgs/morph_compare.yaml`` for MORPH II;
- the CoOp paper's other fine-tuning baselines: Zhou et al., "Learning to Prompt for Vision-Language Models",
  IJCV 2022, Sec. 4 (their comparison with other fine-tuning methods gives no recipe of their own: CoOp's is used).
No data and no weights are read: ``resolve`` only.
"""
from __future__ import annotations

import pytest

from vlprompt.cli import main
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method, method_names
from vlprompt.runs import resolve

# Dassl's defaults (dassl/config/defaults.py, _C.OPTIM): CoOp, CoCoOp and PLOT configs leave these unset
DASSL_SGD = {"momentum": 0.9, "weight_decay": 5e-4}
# CoOp's schedule, every configs/trainers/CoOp/*.yaml (e.g. rn50_ep50.yaml lines 15-22) and CoCoOp's
# vit_b16_c4_ep10_batch1_ctxv1.yaml lines 16, 17, 19-22: sgd, lr 0.002, cosine, 1 constant warm-up epoch at 1e-5
COOP_SCHEDULE = {"optimizer": "sgd", "lr": 0.002, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5}


def _resolved(method, dataset, shots=16, **extra):
    return resolve({"method": method, "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots},
                    **extra})


def _subset(d: dict, keys) -> dict:
    return {k: d[k] for k in keys}


def _check(cfg, train: dict, options: dict):
    if train:
        got = cfg.train.to_dict()
        assert _subset(got, train) == train, {k: (got[k], v) for k, v in train.items() if got[k] != v}
    got = cfg.method_options
    assert _subset(got, options) == options, {k: (got[k], v) for k, v in options.items() if got[k] != v}


def test_cocoop_resolves_to_the_papers_batch_1_recipe():
    cfg = _resolved("cocoop", "dtd")
    _check(cfg, {
        "batch_size": 1,  # vit_b16_c4_ep10_batch1_ctxv1.yaml line 3: DATALOADER.TRAIN_X.BATCH_SIZE: 1
        "epochs": 10,  # line 18: OPTIM.MAX_EPOCH: 10
        **COOP_SCHEDULE, **DASSL_SGD}, {
        "init": "a photo of a",  # line 34: TRAINER.COCOOP.CTX_INIT (N_CTX 4, line 33, is its token count)
        "class_position": "end",  # CoCoOp's PromptLearner always puts the class name last
        "n_ctx": None,  # from the init: 4 vectors (line 33)
    })
    # batched training stays available, and is said to change the number of steps
    assert _resolved("cocoop", "dtd", train={"batch_size": 8}).train.batch_size == 8


def test_cocoop_help_says_a_batch_divides_the_optimizer_steps(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--method", "cocoop", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "batch 1, 10 epochs" in text and "--batch-size B takes B images per step" in text
    assert "B times fewer optimizer steps" in text


def test_coop_epochs_follow_the_shots():
    # CoOp paper Sec. 4.1 and configs/trainers/CoOp/rn50_ep50 / _ep100 / _ep200.yaml (scripts/coop/main.sh picks
    # them by shots); ImageNet: rn50_ep50.yaml whatever the shots; batch 32 (rn50_ep50.yaml line 3)
    for shots, epochs in ((1, 50), (2, 100), (4, 100), (8, 200), (16, 200)):
        cfg = _resolved("coop", "oxford_flowers", shots=shots)
        _check(cfg, {"epochs": epochs, "batch_size": 32, **COOP_SCHEDULE, **DASSL_SGD},
               {"n_ctx": None, "csc": False, "class_position": "end", "init": None})  # scripts/coop/main.sh
    assert _resolved("coop", "imagenet").train.epochs == 50


@pytest.mark.parametrize("dataset, global_logits", [("imagenet", True), ("dtd", False), ("imagenet_sketch", False)])
def test_plot_recipe_and_imagenet_global_logits(dataset, global_logits):
    cfg = _resolved("plot", dataset)
    _check(cfg, {
        "batch_size": 128,  # plot-coop/configs/trainers/PLOT/rn50.yaml line 3
        "epochs": 50,  # rn50.yaml line 18
        **COOP_SCHEDULE, **DASSL_SGD},  # rn50.yaml lines 16, 17, 19-22; Dassl's defaults
        {"n_prompts": 4,  # the paper's N (Chen et al., ICLR 2023, Sec. 4.1; the README's `bash main.sh DATASET 4`)
         "n_ctx": None, "csc": False, "class_position": "end",  # scripts/main.sh: NCTX=16, CSC=False, CTP=end
         "ot_eps": 0.1, "ot_iters": 100, "ot_thresh": 1e-2,  # trainers/plot.py: self.eps, self.max_iter, thresh
         # trainers/plot.py CustomCLIP.forward: `if self.dataset == "ImageNet": logits2 = logits2 + logits`
         # (self.dataset = cfg.DATASET.NAME: ImageNet only, not its variants)
         "global_logits": global_logits})
    # the user's setting wins over the dataset's preset
    assert _resolved("plot", "imagenet", method_options={"global_logits": False}).method_options[
        "global_logits"] is False


# OrdinalCLIP: configs/default.yaml (optimizer_cfg, lr_scheduler_cfg, train_dataloder_cfg, trainer_cfg) with
# morph_compare.yaml's overrides (radam.yaml line 13 / 29 / 41; lr_decay_cosine_max_epochs_100.yaml line 16 / 32 / 44)
ORDINAL_TRAIN = {"optimizer": "radam",  # optim/radam.yaml
                 "lr": 1e-4,  # default.yaml optimizer_cfg.lr: 0.0001
                 "epochs": 100,  # lr_decay_cosine_max_epochs_100.yaml: max_epochs 100
                 "scheduler": "cosine",  # the same file: lr_scheduler_name: cosine
                 "batch_size": 32,  # default.yaml data_cfg.train_dataloder_cfg.batch_size: 32
                 "warmup_epochs": 0,  # default.yaml lr_scheduler_cfg.warmup_epoch: 0
                 "eval_every": 1}  # default.yaml trainer_cfg.check_val_every_n_epoch: 1
MORPH_ENCODER = {"image_encoder": "vgg16",  # imdb-vgg16.yaml: image_encoder_name: vgg16 (compare config line 4)
                 "image_encoder_weights": "imdb-wiki",  # imdb-vgg16.yaml: .cache/vgg/vgg_imdb_wiki.pth
                 "image_encoder_input_norm": "auto",  # = ImageNet's for trained weights: default.yaml pixel_mean/std
                 "lr_image_encoder": 1.0}  # tune-image.yaml: lr_image_encoder 0.0001 = the base lr


def test_ordinalclip_resolves_to_the_morph_compare_config():
    cfg = _resolved("ordinalclip", "morph2", shots=0)
    _check(cfg, {**ORDINAL_TRAIN, "weight_decay": 5e-4},  # weight_decay_5e-4.yaml (compare config line 15)
           {**MORPH_ENCODER,
            "init": "age estimation: the age of the person is",  # init-context-morph.yaml (line 5)
            "num_base": 3,  # num-base-rank-3.yaml (line 8)
            "interpolation": "linear",  # rank-interp-linear.yaml (line 7)
            "lr_context": 1.0, "lr_ranks": 1.0,  # tune-ctx-rank.yaml (line 12): both at 0.0001
            "ce_weight": 1.0, "kl_weight": 1.0})  # default.yaml loss_weights: ce_loss 1.0, kl_loss 1.0
    # elsewhere: the paper's recipe without the MORPH II comparison's weight decay and encoder
    other = _resolved("ordinalclip", "utkface", shots=0)
    _check(other, {**ORDINAL_TRAIN, "weight_decay": 0.0},  # default.yaml optimizer_cfg.weight_decay: 0.0
           {"image_encoder": "clip", "init": None})


def test_ordinal_baselines_resolve_to_the_morph_compare_config():
    # morph_compare.yaml's `cnn:` entry (lines 34-44): the Baseline model (baseline.yaml, line 39)
    _check(_resolved("rank-linear", "morph2", shots=0), {**ORDINAL_TRAIN, "weight_decay": 5e-4},
           {**MORPH_ENCODER, "head": "cosine", "loss": "ordinal", "lr_head": 1.0})
    # its `coop:` entry (lines 18-32): plain prompt learner, rank words from data/MORPH/classnames.txt (line 23)
    _check(_resolved("rank-coop", "morph2", shots=0), {**ORDINAL_TRAIN, "weight_decay": 5e-4},
           {**MORPH_ENCODER, "init": "age estimation: the age of the person is", "rank_words": None,
            "lr_context": 1.0, "lr_ranks": 1.0})  # tune-ctx-rank.yaml (line 28)
    # not in the compare config: the paper's optimiser with the comparison's weight decay, the default encoder
    _check(_resolved("rank-regression", "morph2", shots=0), {**ORDINAL_TRAIN, "weight_decay": 5e-4},
           {"image_encoder": "clip"})
    zs = _resolved("rank-zeroshot", "morph2", shots=0)
    assert zs.train is None and zs.seed is None


@pytest.mark.parametrize("method", ["text-transform", "text-bias", "finetune-image"])
def test_coop_paper_baselines_resolve_to_coops_recipe(method):
    # CoOp IJCV 2022 Sec. 4 compares them with CoOp on the same few shots and states no recipe of their own:
    # CoOp's (Sec. 4.1 training details) is assumed; the classifier is the dataset's hand-crafted prompt
    # (Sec. 4.1: the prompts of zero-shot CLIP, CoOp's CUSTOM_TEMPLATES)
    for shots, epochs, dataset in ((1, 50, "dtd"), (4, 100, "dtd"), (16, 200, "dtd"), (16, 50, "imagenet")):
        _check(_resolved(method, dataset, shots=shots),
               {"epochs": epochs, "batch_size": 32, **COOP_SCHEDULE, **DASSL_SGD}, {"templates": ["dataset"]})


def test_baselines_that_learn_nothing_by_gradient():
    zs = _resolved("zeroshot", "dtd", shots=0)  # CoOp's ZeroshotCLIP: the dataset's CUSTOM_TEMPLATES prompt
    assert zs.train is None and zs.method_options == {"templates": ["dataset"]} and zs.data.shots == 0
    lp = _resolved("linear-probe", "dtd")  # CoOp's lpclip/linear_probe.py: L-BFGS logistic regression,
    # max_iter 1000, C searched on val (a coarse sweep 1e6..1e-6 then bisection)
    assert lp.train is None and lp.method_options["max_iter"] == 1000 and lp.method_options["C"] is None


def test_every_registered_method_is_pinned_here():
    pinned = {"zeroshot", "linear-probe", "coop", "cocoop", "plot", "ordinalclip", "rank-linear",
              "rank-regression", "rank-zeroshot", "rank-coop", "text-transform", "text-bias", "finetune-image",
              "kgcoop", "prograd",  # KgCoOp / ProGrad: tests/test_kgcoop.py, tests/test_prograd.py
              "maple",  # tests/test_maple.py::test_recipes_base_to_new_and_cross_dataset_with_their_sources
              "clip-lora"}  # tests/test_clip_lora.py::test_recipe_with_its_sources
    # the recipes of the methods with prompts inside the towers are pinned beside their equality tests
    # (tests/test_ivlp.py, tests/test_vpt.py, tests/test_promptsrc.py)
    pinned |= {"ivlp", "deep-language", "vpt", "promptsrc"}
    pinned |= {"tip-adapter", "tip-adapter-f", "lpp"}  # pinned in tests/test_tip_adapter.py, tests/test_lpp.py
    pinned |= {"taskres", "clip-adapter", "clap"}  # pinned in tests/test_taskres.py, test_clip_adapter.py, test_clap.py
    assert set(method_names()) <= pinned | {n for n in method_names() if n.startswith("test-")}


def test_show_config_prints_the_resolved_recipe(capsys):
    import yaml

    rc = main(["train", "--method", "cocoop", "--dataset", "dtd", "--root", "/nonexistent", "--show-config"])
    out = capsys.readouterr().out
    assert rc == 0
    shown = yaml.safe_load(out)
    assert shown["train"]["batch_size"] == 1 and shown["train"]["epochs"] == 10
    rc = main(["train", "--method", "plot", "--dataset", "imagenet", "--root", "/nonexistent", "--show-config"])
    assert rc == 0 and yaml.safe_load(capsys.readouterr().out)["method_options"]["global_logits"] is True
    rc = main(["train", "--method", "ordinalclip", "--dataset", "morph2", "--root", "/nonexistent", "--shots", "0",
               "--show-config"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert rc == 0 and shown["method_options"]["image_encoder_weights"] == "imdb-wiki"
    assert shown["train"]["weight_decay"] == 5e-4


def test_morph_recipe_without_the_imdb_wiki_weights_says_what_to_pass(tiny_rn, tmp_path):
    """The named IMDB-WIKI start is refused when the method is built (run start: before any data is encoded,
    anything is written or trained), with the flag and the file to pass."""
    cfg = _resolved("ordinalclip", "morph2", shots=0)
    with pytest.raises(ConfigError, match=r"--image-encoder-weights /path/to/vgg_imdb_wiki\.pth"):
        build_method("ordinalclip", cfg.method_options, tiny_rn, [str(a) for a in range(5)])
    # another encoder than the recipe's VGG-16 with the recipe's weights: refused at resolve, naming both flags
    with pytest.raises(ConfigError, match="--image-encoder clip give --image-encoder-weights"):
        _resolved("ordinalclip", "morph2", shots=0, method_options={"image_encoder": "clip"})


def test_morph_weights_refused_before_the_run_directory_is_written(tmp_path, tiny_dir):
    import numpy as np
    from PIL import Image

    from vlprompt.runs import run
    from vlprompt.testing import make_tiny_checkpoint

    root = tmp_path / "ages"
    for age in ("20", "30"):
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            (root / split / age).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16, 3), int(age), np.uint8)).save(root / split / age / f"{i}.png")
    cfg_path, weights = make_tiny_checkpoint(tmp_path / "m", "tiny-rn")
    request = {"method": "ordinalclip", "backbone": str(cfg_path), "pretrained": str(weights),
               "cache_dir": str(tmp_path / "cache"), "data": {"dataset": "folder", "root": str(root), "shots": 0},
               "method_options": {"image_encoder": "vgg16", "image_encoder_weights": "imdb-wiki"},
               "train": {"epochs": 1}}
    with pytest.raises(ConfigError, match="IMDB-WIKI"):
        run(resolve(request), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
