"""
Pretrain a ViT with SimCLR, DenseCL or DenseCL++ (METHOD.md):
    L = (1-lam)*global + lam*dense + gamma*recon + mu*montage

    python pretrain.py                              # the built-in demo: tiny ViT, demo set, a few CPU minutes
    torchrun --nproc_per_node=8 pretrain.py --data /coco/annotations/instances_train2017.json \\
        --lam 0.5 --M 256
    python pretrain.py --lam 0                      # plain SimCLR; --neg densecl --N 0: the DenseCL baseline

One process per GPU under torchrun (NCCL on CUDA, gloo on CPU) or a plain single process. Every random draw is
a function of (--seed, epoch, image index) or (--seed, step), so a resumed run continues exactly and 1 process
equals N processes with the same global batch. Exit codes: 0 done; 2 bad input (one line on stderr); 3
non-finite loss (the last good checkpoint is left as it was); 75 stopped by SIGTERM or SIGUSR1 after writing a
checkpoint (run the same command with --resume to continue; see the README for SLURM). The flags, the demo
preset and what a checkpoint restores on --resume: config.py.
"""
import math
import os
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn

import rundir
import augment
import config
import data
import methods
import pretrainer
import probing
import vit

EXIT_NONFINITE, EXIT_STOPPED = 3, 75  # 75: EX_TEMPFAIL, "try again" (a scheduler's requeue)


# ------------------------------------------------------------------------------------------------------------
# one training step (shared with bench.py)

def step_generator(seed, step, device):
    """The generator of one step's draws: a function of (seed, step) only, identical on every rank."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % (2 ** 63))


def compiled_parts(model, use_compile, world_size=1):
    """What runs every step: the Pretrainer's forward (the views and draws -> the loss; under DDP when
    world_size > 1) and the batched photometric ops, both through torch.compile when use_compile (one graph in
    one process: fullgraph turns any graph break into an error)."""
    device = next(model.parameters()).device
    fwd = model if world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile:
        return torch.compile(fwd, fullgraph=world_size == 1), torch.compile(augment.photometric)
    return fwd, augment.photometric


def train_step(model, fwd, opt, x, args, step, amp_dtype, token_labels=None):
    """One optimisation step on the views x [2B, 3, S, S]: the step's draws (model.draws), the forward and the
    objective (fwd of compiled_parts) under autocast with the dense weight in force (0 for the first
    --lam-warmup steps, then --lam), backward, gradient clipping (--clip-grad), AdamW. Returns the loss
    (detached) and its terms (with --lam-warmup also that weight, with --clip-grad the gradient norm).
    token_labels: the class of every token of x (--oracle-negatives, methods.OracleLabels)."""
    canvases, cell_labels, draws = model.draws(x, step_generator(args.seed, step, x.device))
    # a fill: no host->device copy
    lam = torch.full((), 0.0 if step < args.lam_warmup else args.lam, device=x.device)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        loss, values = fwd(x, canvases, cell_labels, draws, lam, token_labels)
    terms = dict(zip(model.terms, values.unbind()))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.clip_grad:
        terms["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    opt.step()
    if args.lam_warmup:
        terms["lam"] = lam
    return loss.detach(), terms


def param_groups(model, wd):
    """AdamW groups: no weight decay on norms, biases (all 1-d tensors), the CLS token and the position
    embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "cls_token" in name or "pos_embed" in name or name.endswith(".pos")
             else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, peak, warmup_steps, total_steps):
    """Linear warm-up from 0 to `peak`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------------------------------------------------------
# the run

def setup_distributed(args):
    if "RANK" not in os.environ:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend, store=fresh_group_store(rank, world_size), rank=rank,
                                world_size=world_size)
    else:
        dist.init_process_group(backend)
    return rank, world_size, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def fresh_group_store(rank, world_size, timeout=1800):
    """A store of this group alone. torchrun's agents keep one store for every restart of the group, where
    init_process_group would read the addresses a killed group left (its ranks hang or get "Connection
    refused"). No per-attempt key is known to every node (TORCHELASTIC_RESTART_COUNT is counted by each agent
    on its own, and a restart on a membership change counts on none), so rank 0 starts a new store on a free
    port of its host and publishes its address in the agent's store; the other ranks connect to the address
    they read there, and read it again while it is a dead store's (the killed group's rank 0 took its store
    with it)."""
    from datetime import timedelta
    key = f"pretrain/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/group_store"
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout))
    if rank == 0:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, world_size, is_master=True,
                              timeout=timedelta(seconds=timeout), wait_for_workers=False)
        agent.set(key, f"{os.environ['MASTER_ADDR']}:{store.port}")
        return store
    deadline = time.time() + timeout
    while True:
        host, port = agent.get(key).decode().rsplit(":", 1)
        try:
            store = dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timedelta(seconds=5))
            store.set_timeout(timedelta(seconds=timeout))
            return store
        except (RuntimeError, dist.DistStoreError) as e:  # a dead group's store: rank 0 has not published yet
            if time.time() > deadline:
                raise RuntimeError(f"rank {rank}: no store of rank 0 at {host}:{port} after {timeout} s "
                                   f"({e})") from None
            time.sleep(0.5)


def setup(args, ckpt, rank, world_size, device):
    """Everything a run holds, built once: the files, the model (restored from ckpt), AdamW, the compiled
    step, the ContrastiveCrop boxes, the loader over the run, the log window, the online probe. Returns a
    namespace."""
    run = types.SimpleNamespace(step=0, skipped=set(), boxes=None, probe=None, cuda=device.type == "cuda")
    if args.workers is None:
        args.workers = max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    run.files = data.list_images(args.data, args.image_root)
    run.global_batch = args.batch_size * world_size
    if len(run.files) < run.global_batch:
        raise ValueError(f"--data {args.data}: {len(run.files)} images, fewer than one global batch of "
                         f"{run.global_batch}")
    if args.probe_every:  # built before training: a missing label file is an error now, not after an epoch
        json_path = args.probe_json or (args.data if args.data.endswith(".json") else None)
        if json_path is None:
            raise ValueError("--probe-every needs labels: --data a COCO .json, the demo set, or --probe-json")
        run.probe = probing.OnlineProbe(json_path, None if args.probe_json else args.image_root,
                                        args.probe_images, args.img_size, args.agg, args.seed,
                                        min(args.workers, 4))
    run.steps_per_epoch = len(run.files) // run.global_batch
    run.total_steps = args.max_steps or args.epochs * run.steps_per_epoch
    run.warmup_steps = max(1, int(args.warmup * run.steps_per_epoch))
    run.amp_dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and run.cuda) else None
    if run.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        # tiny weights/gradients turn into denormals: up to 17x slower CPU steps
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    run.model = pretrainer.Pretrainer(args).to(device)
    if rank == 0:
        rundir.check_disk_space(args.out_dir, run.model)
    run.opt = torch.optim.AdamW(param_groups(run.model, args.wd), lr=args.lr, betas=(0.9, 0.95),
                                fused=run.cuda or None)
    if ckpt is not None:
        try:
            run.model.load_state_dict({**{"backbone." + k: v for k, v in ckpt["model"].items()},
                                       **ckpt["heads"]})
            run.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another architecture / flags than this run's
            raise ValueError(f"--resume: {args.out_dir}/ckpt.pt does not fit this model: "
                             f"{' '.join(str(e).split())[:600]}") from None  # one line, as every error
        # skipped: unreadable files met on this rank
        run.step, run.skipped = ckpt["step"], set(ckpt["skipped"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    use_compile = args.compile == "on" or (args.compile == "auto" and run.cuda)
    run.fwd, run.photometric = compiled_parts(run.model, use_compile, world_size)
    if args.crop == "ccrop":  # one (h0, w0, h1, w1) per file, in shared memory so loader workers see updates
        methods.ccrop_due(0, args.ccrop_warmup, args.ccrop_every)  # checks the flags
        methods.check_ccrop_k(args.ccrop_k)
        run.boxes = torch.tensor(methods.FULL_BOX).repeat(len(run.files), 1)
        if ckpt is not None and "ccrop_boxes" in ckpt:
            if ckpt["ccrop_boxes"].shape != run.boxes.shape:
                raise ValueError(f"--resume: the checkpoint holds {ckpt['ccrop_boxes'].shape[0]} "
                                 f"ContrastiveCrop boxes, --data {args.data} has {len(run.files)} images")
            run.boxes.copy_(ckpt["ccrop_boxes"])
        run.boxes.share_memory_()
    if args.decode == "gpu" and not run.cuda:
        raise ValueError(f"--decode gpu needs a CUDA device, this run is on {device}: use --decode cpu or auto")
    run.decode_gpu = args.decode == "gpu" or (args.decode == "auto" and run.cuda)
    # the class masks: a demo-layout set's loaded once (a missing one is an error now), a COCO json's as needed
    if args.oracle_stuff and os.path.isdir(args.data):
        raise ValueError(f"--oracle-stuff adds to the classes of a COCO instances .json as --data, not to a "
                         f"folder ({args.data})")
    run.oracle = methods.OracleLabels(
        run.files, run.model.backbone.grid, args.seed if args.oracle_shuffle else None,
        coco_json=None if os.path.isdir(args.data) else args.data, stuff_json=args.oracle_stuff,
        image_root=args.image_root) if args.oracle_negatives else None
    dataset = data.TwoViews(run.files, args.img_size, seed=args.seed, boxes=run.boxes,
                            ccrop_alpha=args.ccrop_alpha, ccrop_warmup=args.ccrop_warmup,
                            device_decode=run.decode_gpu)
    run.sampler = data.RunSampler(len(run.files), run.global_batch, rank, world_size, args.seed)
    run.loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=run.sampler,
                                             num_workers=args.workers, collate_fn=data.two_view_batch,
                                             pin_memory=run.cuda, prefetch_factor=4 if args.workers else None,
                                             persistent_workers=args.workers > 0)
    n_canvases = sum(2 * max(1, math.ceil(args.batch_size / r ** 2))
                     for r in run.model.montage_r) * world_size
    flops = 3 * vit.vit_flops(run.model.backbone.config, args.img_size) * (2 * run.global_batch + n_canvases)
    run.window = rundir.LogWindow(os.path.join(args.out_dir, "log.jsonl"), rank, world_size, device,
                                  run.total_steps, run.global_batch, flops)
    return run


def state(run, args):
    """The checkpoint of a run: the backbone in timm's layout, its config, the heads, AdamW, the flags, the
    step."""
    heads = {k: v for k, v in run.model.state_dict().items() if not k.startswith("backbone.")}
    return {"model": run.model.backbone.state_dict(), "vit_config": run.model.backbone.config, "heads": heads,
            "optimizer": run.opt.state_dict(),
            "args": {k: v for k, v in vars(args).items() if k != "explicit"},
            "step": int(run.step), "epoch": int(run.step // run.steps_per_epoch),
            "skipped": sorted(run.skipped), "rng": {"torch": torch.get_rng_state()},
            **({"ccrop_boxes": run.boxes.clone()} if run.boxes is not None else {})}


def loader_pass(run, args, rank, device):
    """Where the next pass of the loader stops: the end of the run, or with ContrastiveCrop the next epoch
    whose boxes are due (so no sample is drawn with stale boxes); the boxes of this epoch are computed first
    if due."""
    epoch, spe = run.step // run.steps_per_epoch, run.steps_per_epoch
    if run.boxes is None:
        return run.total_steps
    if run.step % spe == 0 and methods.ccrop_due(epoch, args.ccrop_warmup, args.ccrop_every):
        t0 = time.time()
        run.boxes.copy_(methods.localise(run.model.backbone, run.files, args.img_size, args.ccrop_heat,
                                         args.ccrop_k, args.batch_size, args.workers, device, run.amp_dtype))
        run.window.t0 += time.time() - t0  # not counted in the img/s of the log
        if rank == 0:
            area = ((run.boxes[:, 2] - run.boxes[:, 0]) * (run.boxes[:, 3] - run.boxes[:, 1])).mean().item()
            print(f"ccrop: new boxes at epoch {epoch}, mean area {area:.3f} ({time.time() - t0:.1f} s)",
                  flush=True)
    due = next((e for e in range(epoch + 1, run.total_steps // spe + 1)
                if methods.ccrop_due(e, args.ccrop_warmup, args.ccrop_every)), None)
    return min(run.total_steps, due * spe) if due is not None else run.total_steps


def train(args, ckpt=None, changed=()):
    rank, world_size, device = setup_distributed(args)
    ckpt_path, _ = rundir.prepare_out_dir(args, rank)
    # as nanoGPT's configurator: what the flags did not set
    for source, k, old, new in changed if rank == 0 else ():
        default = "default" if source.startswith("preset") else "command-line default"
        print(f"{source}: --{k.replace('_', '-')} {new} ({default} {old})", flush=True)
    run = setup(args, ckpt, rank, world_size, device)
    if rank == 0:
        print(f"preset {args.preset or 'none'}; {len(run.files)} images from {args.data}; {world_size} "
              f"process(es) on {device}; global batch {run.global_batch}; {run.steps_per_epoch} steps/epoch, "
              f"{run.total_steps} steps; backbone {args.model} "
              f"{sum(p.numel() for p in run.model.backbone.parameters()) / 1e6:.1f}M params; "
              f"{config.objective_summary(args)} montage={run.model.montage_r or 'off'}"
              + (f" (resumed at step {run.step})" if ckpt else ""), flush=True)
    peak_lr = args.lr * run.global_batch / 256
    run.model.train()
    run.window.reset(run.step)
    with rundir.StopSignals() as signals:
        while run.step < run.total_steps:  # one pass of the loader; with ContrastiveCrop one per localisation
            run.sampler.set_steps(run.step, loader_pass(run, args, rank, device))
            loader = run.oracle.tap(run.loader) if run.oracle else run.loader
            for x, batch_skipped in augment.device_batches(loader, device, run.photometric, args.img_size):
                labels = run.oracle.next(run.step).to(device, non_blocking=True) if run.oracle else None
                lr = lr_at(run.step, peak_lr, run.warmup_steps, run.total_steps)
                for group in run.opt.param_groups:
                    group["lr"] = lr
                loss, terms = train_step(run.model, run.fwd, run.opt, x, args, run.step, run.amp_dtype, labels)
                run.window.update(loss, terms)
                for path in set(batch_skipped) - run.skipped:
                    run.skipped.add(path)
                    print(f"[rank {rank}] skipped unreadable file: {path}", flush=True)
                run.step += 1
                step, epoch = run.step, run.step // run.steps_per_epoch
                last, epoch_end = step == run.total_steps, step % run.steps_per_epoch == 0
                log_now = step % args.log_every == 0 or last or (signals.requested and world_size == 1)
                ckpt_now = step % args.ckpt_every == 0 or last
                # a non-finite loss stops the run before anything is saved from it (on CUDA checked at the
                # syncs)
                if (not run.cuda or log_now or ckpt_now) and not run.window.finite():
                    if rank == 0:
                        where = f"step {step - 1}" if not run.cuda else f"steps {run.window.first}-{step - 1}"
                        print(f"error: non-finite loss at {where}; stopping. The last good checkpoint "
                              f"{ckpt_path} is left as it was.", file=sys.stderr, flush=True)
                    cleanup(world_size)
                    return EXIT_NONFINITE
                stopping = log_now and run.window.flush(step, epoch, lr, len(run.skipped), signals.requested)
                if ckpt_now or stopping:
                    if rank == 0:
                        rundir.save_checkpoint(ckpt_path, state(run, args))
                    if world_size > 1:
                        dist.barrier()
                if epoch_end and args.keep_every and epoch % args.keep_every == 0 and rank == 0:
                    rundir.save_snapshot(args.out_dir, epoch, state(run, args))
                if epoch_end and run.probe is not None and epoch % args.probe_every == 0:
                    run_probe(run.probe, run.model, step, epoch, rank, world_size, device, run.window)
                if stopping:
                    if rank == 0:
                        print(f"stopped by a signal at step {step}: checkpoint {ckpt_path}; run the same "
                              f"command with --resume to continue (exit code {EXIT_STOPPED})", flush=True)
                    cleanup(world_size)
                    return EXIT_STOPPED
                if last:
                    break
    if rank == 0:
        print(f"done: {run.step} steps; checkpoint {ckpt_path}; skipped {len(run.skipped)} unreadable files "
              f"on rank 0" + (": " + ", ".join(sorted(run.skipped)) if run.skipped else ""), flush=True)
    cleanup(world_size)
    return 0


def run_probe(probe, model, step, epoch, rank, world_size, device, window):
    """The online probe on rank 0 (its own generator and a forked RNG: the training draws are untouched); the
    other ranks wait at a barrier. Its time is not counted in the img/s of the log."""
    t0 = time.time()
    if rank == 0:
        result = probe(model.backbone, device)
        print(f"probe: step {step} ep {epoch} | probe_mAP {result['probe_mAP']:.2f} on {result['n_heldout']} "
              f"held-out images, head on {result['n_train']} ({result['probe_s']:.1f} s)", flush=True)
        window.write({"step": step, "epoch": epoch, **result})
    if world_size > 1:
        dist.barrier()
    window.t0 += time.time() - t0


def cleanup(world_size):
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    try:
        args, ckpt, changed = config.configure(sys.argv[1:] if argv is None else argv, __doc__)
        return train(args, ckpt, changed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
