"""
The configuration of a pretrain.py run, top to bottom:

    get_args_parser   every flag, with its help (python pretrain.py --help)
    PRESETS           the recipe of each scale (demo, demo-large, coco): one definition, whichever script
                      starts the run; `python pretrain.py` without --data runs the demo
    NEEDS             flags that act only in some configurations (given where they do nothing: an error)
    configure         the command line, then the preset, then the checkpoint's flags on --resume; the list of
                      every value a preset or the checkpoint changed; the per-process batch from the global
                      one; the dense-loss flags translated once
    objective_summary the settings in force, for the first log line

bench.py and the tests build models from a pretrain.py command line with resolve_args.
"""
import argparse
import os

import demo
import losses
import methods
import rundir
import vit


def get_args_parser(description=None):
    """pretrain.py's flags (its --help shows `description`, pretrain.py's docstring)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--preset", choices=sorted(PRESETS), default=None, help="the recipe of a scale for every flag you "
        "do not give (printed first): demo (the demo set, a tiny ViT, a few CPU minutes; the default without "
        "--data), demo-large (a generated set of 2000 + 1000 images, 20 epochs), demo-clutter (the demo on "
        "scenes of mostly objects and labelled stuff), coco (the full recipe at a global batch of 256, on any "
        "number of GPUs)")
    add("--data", default=None, help="image folder (recursive) or COCO instances .json; default: the set of "
        "the preset (demo, demo-large); without --data and --preset: the demo")
    add("--image-root", default=None,
        help="images folder of a COCO .json (default: guessed from the json path)")
    add("--img-size", type=int, default=224, help="crop size of each view")
    add("--workers", type=int, default=None, help="data-loader processes per GPU (decode + crop); default: "
        "the CPU cores divided by the processes on this node")
    add("--decode", choices=["auto", "gpu", "cpu"], default="auto", help="where the JPEGs are decoded and "
        "cropped: gpu (nvJPEG in the training process; the workers only read the files and draw the crops; "
        "PNGs, CMYK and progressive JPEGs stay on the workers), cpu (the workers), auto: gpu on CUDA")
    group = parser.add_argument_group("model")
    add = group.add_argument
    add("--model", default="vit_small", choices=sorted(vit.CONFIGS), help="backbone config (vit.py)")
    add("--head-hidden", type=int, default=2048, help="hidden width of the projection heads")
    add("--head-out", type=int, default=128, help="output width of the projection heads")
    add("--agg", choices=["cls", "gap"], default="gap",
        help="global feature: CLS token or mean of the patch tokens")
    add("--pair", choices=["backbone", "head"], default="backbone",
        help="features of the dense matching (METHOD 3)")
    add("--decoder", choices=["conv", "transformer"], default="conv",
        help="reconstruction decoder (METHOD 7)")
    group = parser.add_argument_group("objective (METHOD.md 2-7)")
    add = group.add_argument
    add("--lam", type=float, default=0.5, help="weight of the dense loss (0 = SimCLR)")
    add("--lam-warmup", type=int, default=0, help="steps with dense weight 0 (the global loss alone) before "
        "--lam applies (DenseCL's warm-up)")
    add("--neg", choices=list(losses.NEGATIVES), default="guided",
        help="dense negatives from the other images")
    add("--M", type=int, default=256, help="candidate sets of guided sampling")
    add("--beta", type=float, default=0.5, help="threshold inside the guided set score; < -1 turns it off")
    add("--score-tokens", type=int, default=0, help="score the thresholded guided sets on this many random "
        "anchor tokens per view instead of all (0 = all, exact; the loss always uses every token)")
    add("--N", type=int, default=None, help="cross-view negatives per anchor token (0 = none; default: the "
        "poster's 64 of 196 tokens, as that share of the view's tokens: 21 of 64 in the demo; METHOD.md 10.1)")
    add("--xv-exclude", type=int, default=0, help="also keep the K partner tokens most similar to the "
        "anchor after its match (by the pairing feature) out of the cross-view negatives")
    add("--neg-draw", choices=list(losses.NEG_DRAWS), default="shared", help="--neg random: one token of "
        "each other view per step, shared by every anchor (shared), or drawn for every anchor token "
        "(independent; METHOD.md 4.3)")
    add("--detach-neg", action="store_true", help="the dense negatives carry no gradient, as a momentum "
        "encoder's keys (anchors and positives keep theirs; METHOD.md 4.1)")
    add("--oracle-negatives", action="store_true", help="a DIAGNOSTIC that reads labels: drop every dense "
        "negative token whose class equals the anchor token's (METHOD.md 4.8). The classes: a demo-layout "
        "set's voc/SegmentationClass masks, or with --data a COCO instances .json its annotations (the 80 "
        "things, the rest one class 0; ~10 ms an image the first time a process meets it)")
    add("--oracle-stuff", default=None, help="with --oracle-negatives and --data a COCO instances .json: "
        "COCO-Stuff's annotations of the same images (stuff_train2017.json), so that the stuff kinds are "
        "classes of their own instead of one background class (METHOD.md 4.8)")
    add("--oracle-shuffle", action="store_true", help="the CONTROL of --oracle-negatives: its token labels "
        "permuted across the batch's tokens every step (a generator seeded by --seed and the step), so about as "
        "many negatives leave the sum, but not by class (METHOD.md 4.8)")
    add("--gamma", type=float, default=0.0, help="weight of the auxiliary reconstruction loss")
    add("--recon", choices=["l2", "l1"], default="l2", help="reconstruction loss")
    add("--norm-pix", action="store_true",
        help="reconstruction target normalised per patch (mean/variance, as MAE)")
    add("--tau-g", type=float, default=0.2, help="temperature of the global NT-Xent")
    add("--tau-d", type=float, default=0.2, help="temperature of the dense loss")
    group = parser.add_argument_group("ContrastiveCrop (METHOD.md 9)")
    add = group.add_argument
    add("--crop", choices=["rrc", "ccrop"], default="rrc", help="crop of both views: RandomResizedCrop, or "
        "ContrastiveCrop (boxes from the model's heat maps, centre-suppressed sampling)")
    add("--ccrop-alpha", type=float, default=0.6, help="Beta(alpha, alpha) of the crop centre in the box (< "
        "1 pushes centres to the box edges, 1 = uniform)")
    add("--ccrop-k", type=float, default=0.1, help="threshold on the min-max normalised heat map")
    add("--ccrop-warmup", type=int, default=20, help="epochs of plain RRC before the first localisation")
    add("--ccrop-every", type=int, default=20, help="epochs between localisation passes over the train set")
    add("--ccrop-heat", choices=list(methods.HEATS), default="cls_attn", help="heat map: last-block CLS "
        "attention, norm of the last block's tokens before the final LN, or channel sum of the final tokens")
    group = parser.add_argument_group("MCL montage (METHOD.md 8)")
    add = group.add_argument
    add("--montage", action="store_true", help="add the multi-level montage loss: cells of r x r montages "
        "of re-cropped views vs the global embedding of their source image's other view")
    add("--montage-r", type=int, nargs="+", default=[2, 7], help="montage levels: cells per side, each "
        "dividing the token grid (img-size / patch); weights 1/2, 1/4, ... normalised to sum 1")
    add("--montage-block-attn", action="store_true", help="on the canvases, patch tokens attend only to "
        "their own cell (CLS attends everywhere)")
    add("--mu", type=float, default=1.0, help="weight of the montage loss")
    add("--tau-m", type=float, default=0.2, help="temperature of the montage loss")
    group = parser.add_argument_group("optimisation")
    add = group.add_argument
    add("--batch-size", type=int, default=256, help="images per GPU (each gives two views)")
    add("--global-batch", type=int, default=0, help="images per step over all processes: sets --batch-size to "
        "it divided by the number of processes, so a recipe is the same on 1 GPU and on 8 (0 = off; the "
        "presets set it)")
    add("--epochs", type=int, default=300)
    add("--max-steps", type=int, default=0, help="stop after this many steps (0 = run --epochs)")
    add("--lr", type=float, default=1.5e-4, help="peak AdamW learning rate per 256 images (scaled linearly)")
    add("--wd", type=float, default=0.1, help="weight decay (not on norms, biases, CLS token, pos-embed)")
    add("--warmup", type=float, default=40, help="linear warm-up epochs, then cosine decay to 0")
    add("--clip-grad", type=float, default=0.0, help="clip the global gradient norm to this (0 = off; DINO "
        "uses 3.0); the norm before clipping is logged as grad_norm")
    add("--seed", type=int, default=0)
    group = parser.add_argument_group("run")
    add = group.add_argument
    add("--out-dir", default="out", help="checkpoint and log folder; an existing run is resumed or refused")
    add("--resume", action="store_true",
        help="continue from <out-dir>/ckpt.pt (start fresh if there is none)")
    add("--ckpt-every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    add("--keep-every", type=int, default=0, help="also keep the backbone of every K-th epoch as "
        "<out-dir>/ckpt_epoch<E>.pt, for probing a run at several points (0 = off)")
    add("--log-every", type=int, default=20, help="steps between log lines")
    add("--probe-every", type=int, default=0,
        help="every K epochs, an online multi-label linear probe on frozen features (probe_mAP in the log; "
        "0 = off); needs labels: --data a COCO json, the demo set, or --probe-json")
    add("--probe-json", default=None, help="COCO instances file of the online probe (default: --data's json)")
    add("--probe-images", type=int, default=1000, help="images of the online probe: half train its head, "
        "half are held out for its mAP")
    add("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    add("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
        help="autocast dtype (auto: bf16 on CUDA)")
    add("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on on CUDA)")
    return parser


# The recipe of each scale; flags given on the command line win. demo: what `python pretrain.py` without
# --data runs; demo-large: the demo recipe on a generated set 5x larger for 2x the steps; demo-clutter: the
# demo recipe on scenes that are mostly objects and labelled stuff (demo.py); coco: the defaults (the full
# recipe, METHOD.md 10) at DenseCL's global batch. `data` is a generated set (made on first use) unless --data.
DEMO = dict(model="vit_demo", img_size=64, global_batch=64, epochs=50, lr=1e-3, warmup=5, wd=0.05,
            head_hidden=512, workers=2, ckpt_every=100, log_every=10, ccrop_warmup=10, ccrop_every=10,
            montage_r=[2, 4])
PRESETS = {"demo": dict(DEMO, data="data/demo"),
           "demo-large": dict(DEMO, data="data/demo_large", epochs=20, warmup=2),
           "demo-clutter": dict(DEMO, data="data/demo_clutter"),
           "coco": dict(global_batch=256)}
DEMO_SETS = {"data/demo": dict(seed=0), "data/demo_large": dict(seed=1, n_train=2000, n_val=1000),
             "data/demo_clutter": dict(seed=0, clutter=True)}


def preset_data(name):
    """The root of a preset's generated set (made on first use), or None for a preset without one."""
    root = PRESETS[name].get("data")
    return demo.make_demo(root, **DEMO_SETS[root]) if root else None


def cross_view(n, tokens):
    """The poster's n cross-view negatives of T = 196 tokens as the same share of `tokens` (METHOD.md
    10.1)."""
    return min(tokens - 1, round(n * tokens / 196))

# Flags that act only in some configurations: given explicitly where they do nothing, they are an error
NEEDS = [(("neg", "M", "beta", "N", "score_tokens", "xv_exclude", "tau_d", "pair", "lam_warmup", "neg_draw",
           "detach_neg", "oracle_negatives", "oracle_shuffle", "oracle_stuff"), lambda a: a.lam > 0,
          "a dense loss (--lam > 0)"),
         (("neg_draw",), lambda a: a.neg == "random", "--neg random"),
         (("oracle_negatives",), lambda a: a.neg != "densecl", "token negatives (--neg random, guided or all)"),
         (("oracle_shuffle", "oracle_stuff"), lambda a: a.oracle_negatives, "--oracle-negatives"),
         (("M", "beta", "score_tokens"), lambda a: a.neg == "guided", "--neg guided"),
         (("score_tokens",), lambda a: a.beta is not None and a.beta >= -1,
          "the thresholded set score (--beta >= -1)"),
         (("xv_exclude",), lambda a: a.N > 0, "cross-view negatives (--N > 0)"),
         (("decoder", "recon", "norm_pix"), lambda a: a.gamma > 0, "the reconstruction loss (--gamma > 0)"),
         (("montage_r", "montage_block_attn", "mu", "tau_m"), lambda a: a.montage, "--montage"),
         (("ccrop_alpha", "ccrop_k", "ccrop_warmup", "ccrop_every", "ccrop_heat"),
          lambda a: a.crop == "ccrop", "--crop ccrop"),
         (("probe_json", "probe_images"), lambda a: a.probe_every > 0, "--probe-every")]


def explicit_flags(parser, argv):
    """The dests of the flags on the command line (presets and checkpoints do not override them)."""
    return {a.dest for a in parser._actions for s in a.option_strings for arg in argv
            if arg == s or arg.startswith(s + "=")}


def configure(argv, description=None):
    """Parsed flags -> (args, checkpoint or None, [(source, flag, old, new)] of every value a preset or the
    checkpoint changed). Applied in this order: the command line, the preset (--preset; demo without --data),
    the checkpoint's flags (--resume); then flags that do nothing in the configuration are refused, --N
    defaults to the poster's share of the tokens, --global-batch sets the batch of each of the WORLD_SIZE
    processes, and the dense-loss flags are translated once: beta < -1 -> None (no thresholding), M -> 1
    unless guided, score_tokens 0 -> None (exact scoring)."""
    parser = get_args_parser(description)
    args = parser.parse_args(argv)
    args.explicit, changed = explicit_flags(parser, argv), []

    def override(source, values):
        for k, v in values.items():
            if k not in args.explicit and k not in ("resume", "explicit") and getattr(args, k, None) != v:
                changed.append((source, k, getattr(args, k, None), v))
                setattr(args, k, v)
    if args.preset is None and args.data is None:
        args.preset = "demo"
    if args.preset:
        preset = dict(PRESETS[args.preset])
        root = preset.pop("data", None)
        if args.data is None and root:  # its generated set (made once), with the labels of the online probe
            root = preset_data(args.preset)
            args.data = os.path.join(root, "images", "train")
            args.probe_json = args.probe_json or os.path.join(root, "annotations", "instances_train.json")
        if "batch_size" in args.explicit:  # a per-GPU batch given by hand wins over the recipe's global one
            preset.pop("global_batch")
        override(f"preset {args.preset}", preset)
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = rundir.load_checkpoint(path) if args.resume and os.path.exists(path) else None
    if ckpt is not None:
        override("checkpoint", ckpt["args"])
    T = (args.img_size // vit.CONFIGS[args.model]["patch_size"]) ** 2
    if args.N is None:
        args.N = cross_view(64, T)
    for dests, used, what in NEEDS:
        for d in dests:
            if d in args.explicit and not used(args):
                raise ValueError(f"--{d.replace('_', '-')} {getattr(args, d)} has no effect without {what}: "
                                 f"drop it or change the configuration")
    if "batch_size" in args.explicit and "global_batch" in args.explicit:
        raise ValueError("--batch-size and --global-batch both given: pass one of them")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.global_batch:
        if args.global_batch % world:
            raise ValueError(f"--global-batch {args.global_batch} does not divide over {world} processes")
        args.batch_size = args.global_batch // world
    if args.lam > 0 and not 0 <= args.N <= T - 1 - args.xv_exclude:
        raise ValueError(f"--N {args.N}: at most T-1-xv_exclude = {T - 1 - args.xv_exclude} cross-view "
                         f"negatives with T = {T} tokens a view (--model {args.model} at --img-size "
                         f"{args.img_size})")
    guided = args.neg == "guided"
    args.beta = args.beta if guided and args.beta is not None and args.beta >= -1 else None
    args.M = args.M if guided else 1
    args.score_tokens = (args.score_tokens or None) if guided and args.beta is not None else None
    return args, ckpt, changed


def resolve_args(argv):
    """The flags of a pretrain.py command line as the run would use them (bench.py and the tests build
    models)."""
    return configure(argv)[0]


def objective_summary(args):
    """The settings in force, for the first log line: a flag NEEDS leaves without effect is not shown, nor a
    switch that is off."""
    keys = ("lam", "neg", "M", "beta", "N", "pair", "gamma", "agg", "crop", "neg_draw", "detach_neg",
            "oracle_negatives", "oracle_shuffle")
    return " ".join(f"{k}={getattr(args, k)}" for k in keys if getattr(args, k, None) is not False
                    and all(used(args) for dests, used, _ in NEEDS if k in dests))
