"""``vlprompt train | eval | export | predict | interpret``."""
from __future__ import annotations


from .common import add_backbone_options, add_data_options, data_config, pretrained_arg, print_json


def register(sub) -> None:
    from ..methods import method_names

    p = sub.add_parser("train", help="train a prompt-learning method (CoOp, CoCoOp, ...)")
    p.add_argument("--method", required=True, choices=method_names())
    add_backbone_options(p)
    add_data_options(p)
    p.add_argument("--output", required=True, help="run directory")
    m = p.add_argument_group("method (CoOp family)")
    m.add_argument("--n-ctx", type=int, default=None, help="context length M (CoOp 16, CoCoOp 4)")
    m.add_argument("--csc", action="store_true", help="class-specific context")
    m.add_argument("--class-position", default=None, choices=["end", "middle", "front"])
    m.add_argument("--init", default=None,
                   help="initialise the context from words (e.g. 'a photo of a'); 'random' for N(0, 0.02)")
    m.add_argument("--text-mode", default=None, choices=["auto", "plain", "cut", "prefix"],
                   help="text path (all exact; auto picks the fastest)")
    m.add_argument("--n-prompts", type=int, default=None, help="PLOT: prompts per class N (4)")
    m.add_argument("--ot-eps", type=float, default=None, help="PLOT: entropic regularisation of the transport (0.1)")
    m.add_argument("--ot-iters", type=int, default=None, help="PLOT: at most this many Sinkhorn iterations (100)")
    m.add_argument("--ot-thresh", type=float, default=None, help="PLOT: Sinkhorn stopping threshold (0.01)")
    m.add_argument("--ot-grad", action="store_true", help="PLOT: differentiate through the plan (paper: detached)")
    m.add_argument("--plot-global-logits", action="store_true",
                   help="PLOT: add the global feature's logits (the reference does for ImageNet)")
    m.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config (repeatable)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None,
                   help="default: the paper's preset by shots (50/100/100/200/200; ImageNet 50); 0 trains nothing")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--optimizer", default=None, choices=["sgd", "adamw", "adam", "radam"])
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--warmup-epochs", type=int, default=None)
    t.add_argument("--views", type=int, default=10, help="cached augmented views per training image")
    t.add_argument("--online", action="store_true", help="augment and encode images at every step (as the papers)")
    t.add_argument("--no-augment", action="store_true", help="train on the test transform (one view)")
    t.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    t.add_argument("--eval-every", type=int, default=None,
                   help="evaluate on val every N epochs (default 0: never; ordinal methods: 1, selecting the best "
                        "epoch on val)")
    t.add_argument("--workers", type=int, default=0, help="threads loading images in online mode")
    t.add_argument("--nonfinite", default="error", choices=["error", "skip"])
    t.add_argument("--max-steps", type=int, default=0, help="stop after N steps (smoke tests)")
    p.add_argument("--tensorboard", action="store_true", help="also log to RUN/tensorboard (needs tensorboard)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain even if the run directory holds a run")
    p.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run on any dataset or class split")
    e.add_argument("run", help="run directory")
    add_data_options(e, fewshot=False)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--base-to-new", action="store_true",
                   help="evaluate the base and the new classes (test split) and report their harmonic mean")
    e.add_argument("--device", default=None)
    e.add_argument("--cache-dir", default=None)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a deployable head (safetensors + JSON)")
    x.add_argument("run")
    x.add_argument("--output", default=None, help="head directory (default RUN/export)")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("predict", help="top-k classes of image files with an exported head")
    r.add_argument("head", help="head directory written by `vlprompt export`")
    r.add_argument("images", nargs="+")
    r.add_argument("--topk", type=int, default=5)
    r.add_argument("--device", default=None)
    r.add_argument("--json", action="store_true", help="print JSON")
    r.set_defaults(func=cmd_predict)

    i = sub.add_parser("interpret", help="nearest vocabulary words to each learned context vector")
    i.add_argument("run")
    i.add_argument("--topk", type=int, default=5)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_interpret)


def method_options(args) -> dict:
    from ..errors import VLPromptError
    from ..methods import get_method
    from .common import parse_kv

    _, cfg_cls = get_method(args.method)
    fields = set(cfg_cls.__dataclass_fields__)
    opts = {}
    for name, key in (("n_ctx", "n_ctx"), ("class_position", "class_position"), ("init", "init"),
                      ("text_mode", "text_mode"), ("n_prompts", "n_prompts"), ("ot_eps", "ot_eps"),
                      ("ot_iters", "ot_iters"), ("ot_thresh", "ot_thresh")):
        value = getattr(args, name)
        if value is not None:
            if key not in fields:
                raise VLPromptError(f"--{name.replace('_', '-')} does not apply to {args.method}")
            opts[key] = None if (key == "init" and value.lower() in ("random", "none")) else value
    if args.csc:
        if "csc" not in fields:
            raise VLPromptError(f"--csc does not apply to {args.method}")
        opts["csc"] = True
    for name, key in (("ot_grad", "ot_grad"), ("plot_global_logits", "global_logits")):
        if getattr(args, name):
            if key not in fields:
                raise VLPromptError(f"--{name.replace('_', '-')} does not apply to {args.method}")
            opts[key] = True
    extra = parse_kv(args.method_option)
    unknown = set(extra) - fields
    if unknown:
        raise VLPromptError(f"{args.method} has no option(s) {sorted(unknown)}; it has {sorted(fields)}")
    opts.update(extra)
    return opts


def train_config(args):
    from ..engine.trainer import TrainConfig
    from ..methods import get_method

    cls, _ = get_method(args.method)
    base = getattr(cls, "train_defaults", {})
    cfg = TrainConfig(**base)
    updates = {"views": args.views, "online": args.online, "augment": not args.no_augment,
               "seed": args.seed, "checkpoint_every": args.checkpoint_every,
               "batch_workers": args.workers, "nonfinite": args.nonfinite, "max_steps": args.max_steps}
    for name, unset in (("epochs", None), ("eval_every", 0)):  # else the method's own preset (OrdinalCLIP)
        if getattr(args, name) is not None or name not in base:
            updates[name] = unset if getattr(args, name) is None else getattr(args, name)
    for name in ("batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None:
            updates[name] = value
    for k, v in updates.items():
        setattr(cfg, k, v)
    return cfg


def cmd_train(args) -> int:
    from ..runner import RunConfig, default_cache_dir, run_training

    cfg = RunConfig(method=args.method, backbone=args.backbone, pretrained=pretrained_arg(args.pretrained),
                    data=data_config(args), method_options=method_options(args), train=train_config(args),
                    device=args.device, precision=args.precision, cache_dir=args.cache_dir or default_cache_dir(),
                    preprocess=args.preprocess, tensorboard=args.tensorboard)
    results = run_training(cfg, args.output, resume=args.resume, force=args.force, progress=not args.quiet)
    print_json(results)
    return 0


def cmd_eval(args) -> int:
    from ..errors import VLPromptError
    from ..runner import base_to_new, evaluate_run

    if args.base_to_new:
        if args.classes != "all" or args.split != "test":
            raise VLPromptError("--base-to-new evaluates both halves of the test split: drop --classes / --split")
        print_json(base_to_new(args.run, data_config(args), device=args.device, cache_dir=args.cache_dir,
                               progress=not args.quiet))
        return 0

    print_json(evaluate_run(args.run, data_config(args), split=args.split, device=args.device,
                            cache_dir=args.cache_dir, progress=not args.quiet))
    return 0


def cmd_export(args) -> int:
    from ..runner import export_run

    out = export_run(args.run, args.output)
    print(f"exported head to {out}")
    return 0


def cmd_predict(args) -> int:
    from ..runner import predict_images

    rows = predict_images(args.head, args.images, topk=args.topk, device=args.device)
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            top = ", ".join(f"{t['class']} ({100 * t['probability']:.1f}%)" for t in row["top"])
            value = f"value {row['value']:.2f}; " if "value" in row else ""  # ordinal heads
            print(f"{row['image']}: {value}{top}")
    return 0


def cmd_interpret(args) -> int:
    from ..runner import interpret_run

    rows = interpret_run(args.run, topk=args.topk)
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            if "rank" in r:
                who = f"rank {r['rank']}"
            else:
                who = f"prompt {r['prompt']}" + (f", class {r['class']}" if r["class"] else "")
            print(f"{who}, ctx {r['position'] + 1}: " + " ".join(r["words"]))
    return 0
