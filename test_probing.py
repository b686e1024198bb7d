"""Tests of probing.py: the multi-label metrics against brute-force definitions (and sklearn when installed),
COCO reading and multi-hot labels, the online probe of pretrain.py."""
import numpy as np
import pytest
import torch

import probing
import vit
from conftest import labelled_images, tiny_coco
from probing import f1_scores, load_coco, mean_average_precision, multi_hot

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")  # numpy-2 copy= notice

def brute_ap(s, t):
    """AP by its definition: walk the distinct thresholds from high to low, sum (R_k - R_{k-1}) * P_k."""
    ap, prev_r = 0.0, 0.0
    for thr in sorted(set(s.tolist()), reverse=True):
        pred = s >= thr
        tp = sum(1 for p, y in zip(pred, t) if p and y)
        precision, recall = tp / pred.sum(), tp / t.sum()
        ap += (recall - prev_r) * precision
        prev_r = recall
    return ap

def test_map_hand_values():
    assert mean_average_precision([[0.9], [0.8], [0.7], [0.6]], [[1], [0], [1], [0]]) == pytest.approx(
        100 * (0.5 * 1 + 0.5 * 2 / 3))
    # tied scores form one threshold: (0.5, P=1/2), then (1.0, P=2/3)
    ap = mean_average_precision([[0.5], [0.5], [0.1]], [[1], [0], [1]])
    assert ap == pytest.approx(100 * (0.25 + 1 / 3))

def test_map_against_brute_force_with_ties_and_empty_class():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((60, 6)), 1)  # many ties
    targets = (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0  # no positives: skipped
    want = 100 * np.mean([brute_ap(scores[:, c], targets[:, c]) for c in range(6) if c != 4])
    assert mean_average_precision(scores, targets) == pytest.approx(want, abs=1e-9)
    assert mean_average_precision(torch.tensor(scores),
                                  torch.tensor(targets)) == pytest.approx(want, abs=1e-9)

def test_map_against_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores, targets = np.round(rng.random((60, 6)), 1), (rng.random((60, 6)) < 0.3).astype(int)
    targets[:, 4] = 0
    sk = 100 * np.mean([sklearn_metrics.average_precision_score(targets[:, c], scores[:, c]) for c in range(6)
                        if c != 4])
    assert mean_average_precision(scores, targets) == pytest.approx(sk, abs=1e-9)

def test_f1_against_brute_force():
    rng = np.random.default_rng(1)
    scores, targets = rng.random((50, 5)), (rng.random((50, 5)) < 0.4).astype(int)
    scores[:, 2] = 0.1  # a class that is never predicted: its precision is 0/0 = 0
    got = f1_scores(scores, targets)
    tp, fp, fn = np.zeros(5), np.zeros(5), np.zeros(5)
    for i in range(50):
        for c in range(5):
            p, y = scores[i, c] >= 0.5, targets[i, c] == 1
            tp[c] += p and y
            fp[c] += p and not y
            fn[c] += (not p) and y
    assert tp[2] + fp[2] == 0
    prec = [tp[c] / (tp[c] + fp[c]) if tp[c] + fp[c] else 0 for c in range(5)]
    rec = [tp[c] / (tp[c] + fn[c]) if tp[c] + fn[c] else 0 for c in range(5)]
    cp, cr = np.mean(prec), np.mean(rec)
    op, orr = tp.sum() / (tp.sum() + fp.sum()), tp.sum() / (tp.sum() + fn.sum())
    want = dict(CP=cp, CR=cr, CF1=2 * cp * cr / (cp + cr), OP=op, OR=orr, OF1=2 * op * orr / (op + orr))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(100 * want[k], abs=1e-9), k
    assert f1_scores(np.zeros((3, 2)), np.ones((3, 2))) == dict(CP=0, CR=0, CF1=0, OP=0, OR=0, OF1=0)


def test_coco_multi_hot(tmp_path):
    coco = load_coco(str(tiny_coco(tmp_path)), str(tmp_path / "img"))
    labels = multi_hot(coco, sorted(coco.cats))  # columns: ids 3, 7, 12
    assert labels.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_online_probe_is_deterministic_and_leaves_the_callers_rng(tmp_path):
    """The online probe's subset and head come from its own seed: two calls give the same mAP, the caller's
    random state is the same after the call, and its mAP is that of train_linear_head on the same split."""
    data_json = labelled_images(tmp_path / "coco", n=12)
    probe = probing.OnlineProbe(data_json, None, 10, 32, "gap", seed=3, workers=0, steps=50)
    assert (probe.n_train, len(probe.heldout_labels)) == (5, 5)
    torch.manual_seed(0)
    backbone = vit.create_vit("vit_test").eval()
    state = torch.get_rng_state()
    first, second = probe(backbone, torch.device("cpu")), probe(backbone, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    assert first["probe_mAP"] == second["probe_mAP"] and 0 <= first["probe_mAP"] <= 100
    feats = torch.cat([vit.global_feature(probing.frozen_tokens(backbone, probe.images[i][0][None]), "gap")
                       for i in range(len(probe.images))])
    torch.manual_seed(3)
    mean, std, head = probing.train_linear_head(feats[:5], probe.train_labels, 50, 1e-2, 1e-4,
                                                "cpu", quiet=True)
    with torch.no_grad():
        scores = torch.sigmoid(head((feats[5:] - mean) / std)).numpy()
    assert first["probe_mAP"] == pytest.approx(mean_average_precision(scores, probe.heldout_labels), abs=1e-3)


def test_online_probe_leaves_out_an_unreadable_image(tmp_path, capsys):
    """A file of the online probe's subset that cannot be read is left out of its half (named on stderr),
    the probe still scores; probing.Images gives it as a blank image flagged False."""
    data_json = labelled_images(tmp_path / "coco", n=12)
    probe = probing.OnlineProbe(data_json, None, 10, 32, "gap", seed=3, workers=0, steps=20)
    with open(probe.images.paths[7], "w") as f:
        f.write("not an image")  # in the held-out half (5 + 5)
    x, ok = probe.images[7]
    assert not ok and x.shape == (3, 32, 32) and x.abs().sum() == 0 and probe.images[0][1]
    torch.manual_seed(0)
    result = probe(vit.create_vit("vit_test").eval(), torch.device("cpu"))
    assert (result["n_train"], result["n_heldout"]) == (5, 4) and 0 <= result["probe_mAP"] <= 100
    assert "online probe: skipped 1 of 10" in capsys.readouterr().err
