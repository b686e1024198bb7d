"""visualize.py: the attention, correspondence and curve pictures are written, sized as documented and not
blank; bad input is one error line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visualize
import vit
from conftest import make_images


def busy(path, min_colours=50, min_std=10):
    """A picture that shows something: many distinct colours and spread in its pixel values."""
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours and pixels.std() >= min_std


def test_attention_and_correspondence_pictures(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = vit.create_vit("vit_test")
    torch.save({"model": backbone.state_dict(), "vit_config": backbone.config, "args": {"img_size": 32}},
               tmp_path / "ckpt.pt")
    images = make_images(tmp_path / "imgs", n=2)
    paths = [f"{images}/img000.jpg", f"{images}/img001.png"]
    assert visualize.main([str(tmp_path / "ckpt.pt")] + paths + [str(tmp_path / "missing.jpg"), "--out",
                                                                  str(tmp_path / "vis")]) == 0
    assert "skipped" in capsys.readouterr().err
    for stem in ("img000", "img001"):
        attn, match = tmp_path / "vis" / f"attn_{stem}.png", tmp_path / "vis" / f"match_{stem}.png"
        assert busy(attn) and busy(match)
        with Image.open(attn) as a, Image.open(match) as m:
            # image, mean, heads; two views
            assert a.width > (2 + backbone.num_heads) * 128 and m.width > 2 * 128


def test_curves_picture(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [{"step": s, "epoch": s // 5, "loss": 4 - 0.1 * s, "global": 4.2 - 0.1 * s,
             "dense": 3.8 - 0.05 * s, "lr": 1e-3, "img_per_s": 100.0, "skipped": 0} for s in range(1, 21)]
    recs += [{"step": 10, "epoch": 2, "probe_mAP": 41.0, "n_train": 5, "n_heldout": 5, "probe_s": 1.0},
             {"step": 20, "epoch": 4, "probe_mAP": 45.5, "n_train": 5, "n_heldout": 5, "probe_s": 1.0}]
    log.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert visualize.main(["--log", str(log), "--out", str(tmp_path / "vis")]) == 0
    assert busy(tmp_path / "vis" / "curves.png", min_colours=3, min_std=5)
    with Image.open(tmp_path / "vis" / "curves.png") as img:
        assert img.size == (3 * 420, 2 * 220)  # loss, dense, global / probe_mAP


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert visualize.main(["--out", str(tmp_path)]) == 2
    assert visualize.main(["--log", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    assert visualize.main(["--log", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_sweep_series_average_the_grid_as_the_poster_and_pictures_draw():
    """negatives: the mean over the grid points at each level of M, beta and N (the std of those means);
    lambda: one series per aggregation over lam; both pictures are drawn with the poster's mark where
    given."""
    import reproduce
    rows = reproduce.rows_of("negatives", tokens=64)
    value = {name: 10 * i for i, (name, _, _) in enumerate(rows)}  # grid point i: 10 i
    summary = [{"row": name, "mAP": (value[name], 0.0), "values": {"mAP": [value[name]]}, "poster": {}}
               for name, _, _ in rows]
    series = visualize.sweep_series("negatives", summary, "mAP")
    # rows are ordered M (3) x beta (3) x N (4): M 64 holds points 0..11, beta 0.3 holds 0-3, 12-15, 24-27
    assert [(x, m) for x, m, _, _ in series["M"]] == [(64, 55.0), (128, 175.0), (256, 295.0)]
    assert series["beta"][0][1] == pytest.approx(sum(10 * i for i in (0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27))
                                                 / 12)
    assert series["N"][0][0] == 0 and len(series["N"][0][3]) == 9
    lam = [{"row": f"lam {v} {agg}", "mAP": (v * 100, 1.0), "values": {"mAP": [v * 100]}, "poster": {}}
           for agg in ("cls", "gap") for v in (0.1, 0.5)]
    assert visualize.sweep_series("lambda", lam, "mAP") == {"cls": [(0.1, 10.0, 1.0, [10.0]), (0.5, 50.0, 1.0, [50.0])],
                                                            "gap": [(0.1, 10.0, 1.0, [10.0]), (0.5, 50.0, 1.0, [50.0])]}
    picture = visualize.sweep_picture("lambda", lam, "lambda")
    bars = visualize.results_picture([dict(lam[0], poster={"mAP": 20.0})], "bars")
    for img, colour in ((picture, visualize.BLUE), (bars, visualize.RED)):
        assert (np.asarray(img) == colour).all(-1).any()
