"""
The configuration of a pretrain.py run, top to bottom:

    get_args_parser   every flag, with its help (python pretrain.py --help)
    DEMO              the demo preset: what `python pretrain.py` without --data runs
    NEEDS             flags that act only in some configurations (given where they do nothing: an error)
    configure         the command line, then the demo preset, then the checkpoint's flags on --resume; the
                      list of every value a preset or the checkpoint changed; the dense-loss flags translated
                      once
    objective_summary the settings in force, for the first log line

bench.py and the tests build models from a pretrain.py command line with resolve_args.
"""
import argparse
import os

import demo
import losses
import methods
import probing
import rundir
import vit


def get_args_parser(description=None):
    """pretrain.py's flags (its --help shows `description`, pretrain.py's docstring)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    group = parser.add_argument_group("data")
    add = group.add_argument
    add("--data", default=None, help="image folder (recursive) or COCO instances .json; default: the demo "
        "set, which also switches every flag you do not give to the small demo preset")
    add("--image-root", default=None,
        help="images folder of a COCO .json (default: guessed from the json path)")
    add("--img-size", type=int, default=224, help="crop size of each view")
    add("--workers", type=int, default=None, help="data-loader processes per GPU (decode + crop); default: "
        "the CPU cores divided by the processes on this node")
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
    add("--N", type=int, default=64, help="cross-view negatives per anchor token (0 = none)")
    add("--xv-exclude", type=int, default=0, help="also keep the K partner tokens most similar to the "
        "anchor after its match (by the pairing feature) out of the cross-view negatives")
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


# The demo preset: what `python pretrain.py` without --data runs. Flags given on the command line still win.
DEMO = dict(model="vit_demo", img_size=64, batch_size=64, epochs=50, lr=1e-3, warmup=5, wd=0.05,
            head_hidden=512, M=16, N=8, workers=2, ckpt_every=100, log_every=10, ccrop_warmup=10,
            ccrop_every=10, montage_r=[2, 4])
# Flags that act only in some configurations: given explicitly where they do nothing, they are an error
NEEDS = [(("neg", "M", "beta", "N", "score_tokens", "xv_exclude", "tau_d", "pair", "lam_warmup"),
          lambda a: a.lam > 0, "a dense loss (--lam > 0)"),
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
    checkpoint changed). Applied in this order: the command line, the demo preset (no --data), the
    checkpoint's flags (--resume); then flags that do nothing in the configuration are refused, and the
    dense-loss flags translated once: beta < -1 -> None (no thresholding), M -> 1 unless guided, score_tokens
    0 -> None (exact scoring)."""
    parser = get_args_parser(description)
    args = parser.parse_args(argv)
    args.explicit, changed = explicit_flags(parser, argv), []

    def override(source, values):
        for k, v in values.items():
            if k not in args.explicit and k not in ("resume", "explicit") and getattr(args, k, None) != v:
                changed.append((source, k, getattr(args, k, None), v))
                setattr(args, k, v)
    if args.data is None:  # the demo: generate the set once, switch to the small preset
        args.data = os.path.join(demo.make_demo(), "images", "train")
        args.probe_json = args.probe_json or probing.DEMO[0]
        override("demo preset", DEMO)
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = rundir.load_checkpoint(path) if args.resume and os.path.exists(path) else None
    if ckpt is not None:
        override("checkpoint", ckpt["args"])
    for dests, used, what in NEEDS:
        for d in dests:
            if d in args.explicit and not used(args):
                raise ValueError(f"--{d.replace('_', '-')} {getattr(args, d)} has no effect without {what}: "
                                 f"drop it or change the configuration")
    T = (args.img_size // vit.CONFIGS[args.model]["patch_size"]) ** 2
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
    """The settings in force, for the first log line: a flag NEEDS leaves without effect is not shown."""
    keys = ("lam", "neg", "M", "beta", "N", "pair", "gamma", "agg", "crop")
    return " ".join(f"{k}={getattr(args, k)}" for k in keys
                    if all(used(args) for dests, used, _ in NEEDS if k in dests))
