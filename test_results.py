"""results.py: the paired statistics and their sign count, one file set per table and preset."""
import os

import numpy as np
import pytest

import reproduce
import results


def test_paired_differences_and_their_sign_count():
    rows = [("A", ["--lam", "0"], None), ("B", ["--lam", "0.5"], "A")]
    runs = {"A": {0: {"mAP": 50.0, "provenance": {}}, 1: {"mAP": 52.0, "provenance": {}},
                  2: {"mAP": 51.0, "provenance": {}}, 3: {"mAP": 40.0, "provenance": {}}},
            "B": {0: {"mAP": 51.0, "provenance": {}}, 1: {"mAP": 54.0, "provenance": {}},
                  2: {"mAP": 50.5, "provenance": {}}, 4: {"mAP": 90.0, "provenance": {}}}}
    b = results.summarise("main", rows, runs)[1]
    mean, std, pos, n = b["paired"]["mAP"]  # seeds 0, 1, 2 only: +1, +2, -0.5
    assert n == 3 and pos == 2 and mean == pytest.approx(2.5 / 3) and std == pytest.approx(np.std([1, 2, -.5],
                                                                                                     ddof=1))
    assert results.fmt_paired(b["paired"]["mAP"]) == "+0.8 ± 1.3 (2/3 > 0)"
    assert b["mAP"] == (pytest.approx(np.mean([51, 54, 50.5, 90])), pytest.approx(np.std([51, 54, 50.5, 90],
                                                                                          ddof=1)))


def test_one_results_file_set_per_table_and_preset():
    parse = reproduce.get_args_parser().parse_args
    names = {results.results_base(parse(a + ["--out-dir", "r"])) for a in
             (["--table", "main"], ["--table", "lambda"], ["--table", "main", "--preset", "demo-large"],
              ["--quick"])}
    assert names == {os.path.join("r", n) for n in ("results_main_demo", "results_lambda_demo",
                                                     "results_main_demo-large", "results_quick")}
