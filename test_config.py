"""config.py: the flags of a pretrain.py run, the presets, refused flags, the first log line's settings."""
import importlib
import os

import pytest

import config
import pretrain
from conftest import TINY, make_images


@pytest.mark.parametrize("module,argv", [("config", ["--batch", "32"]), ("config", ["--lam-w", "3"]),
                                         ("bench", ["--batch", "4"]), ("probe_multilabel", ["--ep", "2"]),
                                         ("probe_segment", ["--ep", "2"])])


def test_abbreviated_flags_are_refused(module, argv, capsys):
    """argparse would take --batch for --batch-size, unseen by explicit_flags, and the demo preset would
    replace it."""
    parser = importlib.import_module(module).get_args_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [
    (["--neg", "random", "--beta", "0.3"], "--beta"), (["--neg", "densecl", "--M", "8"], "--M"),
    (["--neg", "all", "--score-tokens", "4"], "--score-tokens"), (["--lam", "0", "--N", "3"], "--N"),
    (["--beta", "-2", "--score-tokens", "4"], "--score-tokens"),
    (["--N", "0", "--xv-exclude", "2"], "--xv-exclude"),
    (["--norm-pix"], "--norm-pix"), (["--montage-r", "2"], "--montage-r"),
    (["--ccrop-k", "0.2"], "--ccrop-k"), (["--neg", "random", "--N", "0", "--oracle-shuffle"], "--oracle-shuffle")])


def test_flags_that_do_nothing_are_errors(tmp_path, flags, named, capsys):
    images = make_images(tmp_path / "imgs", n=8)
    code = pretrain.main(TINY + ["--data", images, "--max-steps", "1", "--out-dir",
                                 str(tmp_path / "o")] + flags)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {named} ") and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_first_log_line_names_only_the_settings_in_force():
    def summary(*flags):
        return config.objective_summary(config.resolve_args(list(flags) + ["--data", "unused"]))
    # no dense settings without a dense loss
    assert summary("--lam", "0") == "lam=0.0 gamma=0.0 agg=gap crop=rrc"
    random = summary("--neg", "random")
    assert "neg=random N=64 pair=backbone" in random and "M=" not in random
    assert "neg=guided M=16 beta=0.3 N=5" in summary("--M", "16", "--beta", "0.3", "--N", "5")


def test_dense_flags_are_translated_once():
    """configure turns the flags into the loss arguments: beta < -1 -> None, M -> 1 unless guided,
    score_tokens 0 -> None; flags a user gave are kept, the demo preset does not touch them."""
    def resolved(*flags):
        a = config.resolve_args(list(flags) + ["--data", "unused"])
        return a.neg, a.M, a.beta, a.score_tokens
    assert resolved("--beta", "-2") == ("guided", 256, None, None)
    assert resolved("--beta", "0.5", "--score-tokens", "16") == ("guided", 256, 0.5, 16)
    assert resolved("--beta", "0.5") == ("guided", 256, 0.5, None)
    assert resolved("--neg", "random") == ("random", 1, None, None)


def test_one_recipe_per_scale_whichever_script_starts_it(demo_dir, monkeypatch):
    """`python pretrain.py` and reproduce.py's DenseCL++* row at the demo preset resolve to the same run
    (the demo preset used to set M 16 and N 8 where the reproduction table ran M 256 and N 21); the demo
    presets fix the global batch, so 8 processes train the recipe of one (8 images each); demo-large is the
    demo recipe on its own set (checkpoints every 100 steps: its 620 steps used to write none before step
    1000)."""
    import reproduce
    monkeypatch.chdir(demo_dir)
    keys = ("model", "img_size", "epochs", "lr", "warmup", "wd", "head_hidden", "lam", "neg", "M", "beta", "N",
            "agg", "global_batch", "batch_size", "data", "tau_d", "tau_g")
    star = dict((r[0], r[1]) for r in reproduce.rows_of("main", tokens=64))["DenseCL++* gap"]
    plain = config.resolve_args([])
    row = config.resolve_args(["--preset", "demo"] + star)
    assert {k: getattr(plain, k) for k in keys} == {k: getattr(row, k) for k in keys}
    assert (plain.M, plain.N, plain.batch_size, plain.preset) == (256, 21, 64, "demo")
    monkeypatch.setenv("WORLD_SIZE", "8")
    eight = config.resolve_args(["--preset", "demo"] + star)
    assert (eight.global_batch, eight.batch_size) == (64, 8)
    assert config.resolve_args(["--preset", "demo", "--batch-size", "16"]).batch_size == 16  # by hand: per GPU
    with pytest.raises(ValueError, match="does not divide over 8"):
        config.resolve_args(["--preset", "demo", "--global-batch", "60"])
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(config.demo, "make_demo", lambda root, **kw: root)  # its 3000 images are not needed
    large = config.resolve_args(["--preset", "demo-large"])
    assert (large.ckpt_every, large.log_every, large.montage_r, large.epochs, large.img_size) == (100, 10, [2, 4],
                                                                                                  20, 64)
    assert large.data == os.path.join("data", "demo_large", "images", "train")
    coco = config.resolve_args(["--preset", "coco", "--data", "x.json"])
    assert (coco.batch_size, coco.N, coco.model) == (256, 64, "vit_small")
