"""
The run directory of pretrain.py and what writes into it: checkpoints written to a temp file and renamed (a
crash never leaves a half-written ckpt.pt), loaded with weights_only=True and refused when not ours or not
finite; an existing run is resumed or refused, never overwritten; the disk is checked before training starts;
the log window behind every log line; the signals that stop a run with a checkpoint.

    <out-dir>/ckpt.pt           the latest state: backbone ('model', timm layout), 'vit_config', 'heads',
                                'optimizer', 'args', 'step', 'epoch', 'skipped', 'rng' (+ 'ccrop_boxes')
    <out-dir>/ckpt_epoch<E>.pt  --keep-every snapshots: the backbone, its config and the args at the end of
                                epoch E
    <out-dir>/log.jsonl         one JSON object per log line (and per online probe)
"""
import json
import os
import shutil
import signal
import time

import torch
import torch.distributed as dist

import vit


def save_checkpoint(path, state):
    """torch.save to a temp file, fsync, then rename over `path`: a crash mid-write leaves the previous
    checkpoint."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    """Our checkpoint, refused with a message if it is not a plain tensor file or holds non-finite weights."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "heads", "optimizer", "step", "args"} <= set(ckpt):
        raise ValueError(f"--resume: {path} is not a pretrain.py checkpoint (keys: {sorted(ckpt)[:8]})")
    for part in ("model", "heads"):
        bad = vit.non_finite_keys(ckpt[part])
        if bad:
            raise ValueError(f"--resume: {path} holds non-finite weights in {bad[:3]}; refusing to "
                             f"continue from it")
    return ckpt


def prepare_out_dir(args, rank):
    """Refuse to clobber an existing run, and report an unwritable or full disk before training starts."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not args.resume and (os.path.exists(ckpt_path) or os.path.exists(log_path)):
        found = "ckpt.pt" if os.path.exists(ckpt_path) else "log.jsonl"
        raise ValueError(f"--out-dir {args.out_dir} already holds a run ({found}); pass --resume to continue "
                         f"it or choose another --out-dir")
    if rank == 0:
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            probe = os.path.join(args.out_dir, f".write_test_{os.getpid()}")
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 4096)
            os.remove(probe)
        except OSError as e:
            raise ValueError(f"--out-dir {args.out_dir} is not writable: {e}") from None
    return ckpt_path, log_path


def check_disk_space(out_dir, model):
    """A checkpoint holds the weights and two AdamW moments; the temp file needs room beside the old one."""
    need = 2 * 3 * sum(t.numel() * t.element_size() for t in model.parameters()) + (64 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise ValueError(f"--out-dir {out_dir}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
                         f"{need / 2**20:.0f} MiB; free some space or choose another --out-dir")


def save_snapshot(out_dir, epoch, state):
    """<out-dir>/ckpt_epoch<E>.pt: what a probe reads (backbone, config, args, step, epoch), kept beside
    ckpt.pt."""
    path = os.path.join(out_dir, f"ckpt_epoch{epoch:04d}.pt")
    save_checkpoint(path, {k: state[k] for k in ("model", "vit_config", "args", "step", "epoch")})
    return path


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "4090": 165.0}


def peak_flops(device):
    """Dense bf16 peak of the GPU (for MFU), or None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM sends before it kills a job) set `requested` instead of killing the
    process, so the loop can finish its step and write a checkpoint; the previous handlers come back on
    exit."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class LogWindow:
    """The logged values summed over the steps since the last log line (tensors: no host sync per step).
    flush() averages them over the window and the ranks (one all-reduce that also carries the skipped-file
    count and the stop request, so every rank takes the same decision at the same step), prints one line on
    rank 0 and appends the same as a JSON object to log.jsonl."""

    def __init__(self, path, rank, world_size, device, total_steps, images_per_step, flops_per_step):
        self.path, self.rank, self.world_size, self.device = path, rank, world_size, device
        self.total_steps, self.images_per_step = total_steps, images_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak_flops(device)
        self.reset(0)

    def reset(self, step):
        self.sums, self.steps, self.first, self.t0 = {}, 0, step, time.time()

    def update(self, loss, terms):
        for k, v in [("loss", loss)] + list(terms.items()):
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        self.steps += 1

    def finite(self):
        return bool(torch.isfinite(self.sums["loss"]).item())

    def flush(self, step, epoch, lr, skipped, stop):
        keys = sorted(self.sums)
        vals = torch.cat([torch.stack([self.sums[k] for k in keys]) / self.steps,
                          torch.tensor([float(skipped), float(stop)], device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(vals)
            vals[:-2] /= self.world_size
        values, skipped, stop = vals[:-2].tolist(), int(vals[-2]), bool(vals[-1] > 0)  # .tolist() syncs
        dt = (time.time() - self.t0) / self.steps
        rec = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in zip(keys, values)}, "lr": lr,
               "img_per_s": round(self.images_per_step / dt, 1), "skipped": skipped}
        if self.peak:
            rec["mfu"] = round(100 * self.flops_per_step / dt / (self.peak * self.world_size), 2)
        if self.rank == 0:
            terms = " ".join(f"{k} {rec[k]:.4f}" for k in keys if k != "loss")
            print(
                f"step {step}/{self.total_steps} ep {epoch} | loss {rec['loss']:.4f} ({terms}) | lr {lr:.2e} "
                f"| {rec['img_per_s']:.0f} img/s" + (f" | MFU {rec['mfu']:.1f}%" if self.peak else "") +
                f" | ETA {(self.total_steps - step) * dt / 60:.1f} min" +
                (f" | skipped {skipped}" if skipped else ""), flush=True)
            self.write(rec)
        self.reset(step)
        return stop

    def write(self, rec):
        if self.rank == 0:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
