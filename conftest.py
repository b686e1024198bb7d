"""Helpers and fixtures shared by the test files: tiny images, datasets and runs of pretrain.py, the demo set,
a free port, the one-line error check of the stage scripts."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import demo
import pretrain
import pretrainer
import vit

HERE = os.path.dirname(os.path.abspath(__file__))
# the 32 px test ViT (4x4 tokens), no objective flags
TINY = ["--model", "vit_test", "--img-size", "32", "--head-hidden", "32", "--head-out", "16",
        "--workers", "0", "--log-every", "1", "--lr", "1e-3", "--warmup", "0"]
# guided sampling at a size for 16 tokens (the default --N 64 needs 65 tokens)
GUIDED = ["--M", "4", "--N", "3"]


def make_images(folder, n=16, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(size, size + 4 * (i % 3), 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"))
    return str(folder)


def tiny_trainer(args):
    """A Pretrainer seeded with 0, a copy of its initial state, an AdamW and a batch of 2 x 6 random 32 px
    views."""
    torch.manual_seed(0)
    model = pretrainer.Pretrainer(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.05), lr=1e-3)
    return model, before, opt, torch.randn(12, 3, 32, 32)


def run_pretrain(argv, nproc=1, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + [os.path.join(HERE, "pretrain.py")] + argv
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env)


def losses_by_step(out_dir):
    """The logged loss of every step; for a step logged twice (before a kill and after the resume) the last
    one."""
    return {rec["step"]: rec["loss"] for rec in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))}


def weights(out_dir):
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    return {**ckpt["model"], **ckpt["heads"]}, ckpt


def inductor_works_on_cpu():
    """Whether this machine can build inductor's CPU kernels at all (a C++ compiler and Python headers)."""
    if shutil.which("g++") is None:
        return False
    try:
        return torch.equal(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)), torch.full((3,), 3.0))
    except Exception:  # the environment, not our code: reported as a skip
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A folder holding data/demo (the demo set, made once per session): chdir there to run a probe on it."""
    top = tmp_path_factory.mktemp("work")
    demo.make_demo(str(top / "data" / "demo"))
    return top


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def tiny_coco(folder, n_images=3, size=20):
    """A COCO instances file with non-contiguous category ids (3, 7, 12), a crowd annotation, overlapping
    instances listed large-after-small, and an image without annotations."""
    os.makedirs(folder / "img", exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.new("RGB", (size, size), (40 * i, 80, 120)).save(folder / "img" / f"{i}.jpg")
        images.append(dict(id=i, file_name=f"{i}.jpg", width=size, height=size))
    anns = [dict(id=1, image_id=1, category_id=7, segmentation=square(5, 5, 9, 9), area=16, bbox=[5, 5, 4, 4],
                 iscrowd=0),
            dict(id=2, image_id=1, category_id=3, segmentation=square(2, 2, 12, 12), area=100,
                 bbox=[2, 2, 10, 10], iscrowd=0),
            dict(id=3, image_id=1, category_id=12, segmentation=square(14, 14, 19, 19), area=25,
                 bbox=[14, 14, 5, 5], iscrowd=1),
            dict(id=4, image_id=2, category_id=12, segmentation=square(0, 0, 10, 10), area=100,
                 bbox=[0, 0, 10, 10], iscrowd=1)]  # image 3: no annotations
    cats = [dict(id=c, name=n) for c, n in [(12, "cup"), (3, "cat"), (7, "dog")]]
    path = folder / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path


def save_demo_backbone(tmp_path):
    """A seeded vit_demo (width 128, 4 heads) saved as our checkpoint and as a plain state dict."""
    torch.manual_seed(3)
    backbone = vit.create_vit("vit_demo")
    torch.save({"model": backbone.state_dict(), "vit_config": backbone.config,
                "args": {"agg": "gap", "img_size": 64}},
               tmp_path / "ckpt.pt")
    torch.save(backbone.state_dict(), tmp_path / "plain.pt")
    return backbone


def small_run(tmp_path, name="run", extra=()):
    """A 2-step run with a checkpoint, in this process (a subprocess would spend seconds importing torch)."""
    import pretrain
    images = make_images(tmp_path / "imgs")
    out = tmp_path / name
    assert pretrain.main(TINY + GUIDED + ["--data", images, "--batch-size", "4", "--max-steps", "2",
                                          "--out-dir", str(out)] + list(extra)) == 0
    return images, out


def error_of(main, argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def labelled_images(root, n=16, size=40):
    """make_images in root/train and a COCO file root/annotations/instances_train.json labelling them with 3
    categories (every image at least one), the layout pretrain.py and the probes find on their own."""
    files = sorted(os.listdir(make_images(root / "train", n=n, size=size)))
    images = [dict(id=i + 1, file_name=f, width=size, height=size) for i, f in enumerate(files)]
    anns = [dict(id=k + 1, image_id=img["id"], category_id=c, bbox=[0, 0, 8, 8], area=64, iscrowd=0,
                 segmentation=square(0, 0, 8, 8))
            for k, (img, c) in enumerate((img, c) for img in images for c in (1, 2, 5)
                                         if (img["id"] + c) % 3)]
    os.makedirs(root / "annotations", exist_ok=True)
    path = root / "annotations" / "instances_train.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns,
                                    categories=[dict(id=c, name=f"c{c}") for c in (1, 2, 5)])))
    return str(path)


VOC_XML = """<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>
<depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax>
<ymax>50</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax>
<ymax>12</ymax></bndbox></object></annotation>"""


def write_voc(root, stems, size=(64, 56), xml=VOC_XML, split="trainval"):
    """A VOC root (Annotations, JPEGImages, ImageSets/Main/<split>.txt) of one image per stem."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(root / d, exist_ok=True)
    for k, stem in enumerate(stems):
        Image.new("RGB", size, (30 * k, 90, 160)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(xml.format(stem=stem, w=size[0], h=size[1]))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return str(root)
