"""`fedjax_sim.data.describe` and `fedjax-sim data describe`: statistics checked by hand."""

import json
import math
import os
import re

import numpy as np
import pytest

from fedjax_sim.cli.main import main
from fedjax_sim.data import FederatedData
from fedjax_sim.data.describe import describe, format_description, plot_description, to_jsonable
from fedjax_sim.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_fedavg.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny() -> FederatedData:
    """Three clients of sizes 2, 4, 6 with label counts [2,0,0], [1,2,1], [1,1,4]."""
    y = np.array([0, 0] + [0, 1, 1, 2] + [2, 2, 2, 2, 1, 0], np.int32)
    return FederatedData({"x": np.zeros((12, 2), np.float32), "y": y},
                         np.array([0, 2, 6, 12]), ("a", "b", "c"))


def test_sizes_labels_and_tv_match_hand_computed_values():
    stats = describe(_tiny())
    assert stats["num_clients"] == 3 and stats["num_examples"] == 12
    assert stats["empty_clients"] == 0
    size = stats["client_size"]
    assert (size["min"], size["max"]) == (2, 6)
    # Linear interpolation over the sorted sizes [2, 4, 6].
    assert size["p10"] == pytest.approx(2.4) and size["p50"] == 4.0
    assert size["p90"] == pytest.approx(5.6) and size["mean"] == 4.0
    assert size["std"] == pytest.approx(math.sqrt(8 / 3))
    assert stats["size_histogram"] == {"edges": [2, 3, 4, 5, 6, 7], "counts": [1, 0, 1, 0, 1]}

    labels = stats["labels"]
    assert labels["num_classes"] == 3 and labels["num_labels"] == 12
    assert labels["unit"] == "examples" and labels["clients_with_labels"] == 3
    np.testing.assert_array_equal(stats["per_client"]["label_counts"],
                                  [[2, 0, 0], [1, 2, 1], [1, 1, 4]])
    assert labels["global_distribution"] == pytest.approx([4 / 12, 3 / 12, 5 / 12])
    assert labels["classes_per_client"] == {"mean": pytest.approx(7 / 3), "min": 1, "max": 3}
    assert labels["dominant_fraction"]["mean"] == pytest.approx((1 + 1 / 2 + 4 / 6) / 3)
    assert labels["dominant_fraction"]["p50"] == pytest.approx(4 / 6)
    # TV_a = 1 - q_0 = 2/3 (one class); TV_b = 1/2 (1/12 + 3/12 + 2/12); TV_c = 1/2 (6/12).
    assert labels["label_tv"]["mean"] == pytest.approx((2 / 3 + 1 / 4 + 1 / 4) / 3)
    assert labels["label_tv"]["max"] == pytest.approx(2 / 3)
    assert labels["label_tv"]["p50"] == pytest.approx(1 / 4)


def test_identical_clients_have_zero_tv_and_num_classes_adds_empty_columns():
    y = np.array([0, 1, 2, 0, 1, 2], np.int64)
    data = FederatedData({"y": y}, np.array([0, 3, 6]), ("a", "b"))
    stats = describe(data, num_classes=5)
    assert stats["labels"]["label_tv"]["mean"] == pytest.approx(0.0)
    assert stats["per_client"]["label_counts"].shape == (2, 5)
    assert stats["labels"]["classes_per_client"]["max"] == 3
    with pytest.raises(UserError, match="num_classes"):
        describe(data, num_classes=2)


def test_token_labels_are_flattened_per_client_without_ignore_label():
    y = np.array([[1, 2, 0], [1, 0, 0],   # client a: tokens 1, 2, 1
                  [3, 3, 3],              # client b: tokens 3, 3, 3
                  [0, 0, 0]], np.int32)   # client c: padding only
    data = FederatedData({"y": y}, np.array([0, 2, 3, 4]), ("a", "b", "c"))
    stats = describe(data, ignore_label=0)
    labels = stats["labels"]
    assert labels["unit"] == "tokens" and labels["num_labels"] == 6
    assert labels["clients_with_labels"] == 2  # c has no labels left
    np.testing.assert_array_equal(stats["per_client"]["label_counts"],
                                  [[0, 2, 1, 0], [0, 0, 0, 3], [0, 0, 0, 0]])
    assert labels["classes_per_client"] == {"mean": 1.5, "min": 1, "max": 2}
    # q = [0, 2, 1, 3] / 6; both clients are at TV 1/2 from it.
    assert labels["label_tv"]["mean"] == pytest.approx(0.5)
    assert stats["client_size"]["max"] == 2  # sizes still count rows
    text = format_description(stats)
    assert "tokens" in text and "ignoring label 0" in text and "1 client(s) without labels" in text


def test_sizes_only_and_bad_labels():
    data = FederatedData({"y": np.linspace(0, 1, 5)}, np.array([0, 2, 5]), ("a", "b"))
    assert describe(data, label_key=None)["labels"] is None
    with pytest.raises(UserError, match="label_key=None"):
        describe(data)
    with pytest.raises(UserError, match="no feature 'z'"):
        describe(data, label_key="z")
    negative = FederatedData({"y": np.array([-1, 0, 1])}, np.array([0, 3]), ("a",))
    with pytest.raises(UserError, match="negative labels"):
        describe(negative)


def test_format_and_json():
    stats = describe(_tiny())
    text = format_description(stats, name="tiny")
    assert text.startswith("tiny: 3 clients, 12 examples")
    assert "0.389" in text  # mean TV = 7/18
    row = json.loads(json.dumps(to_jsonable(stats)))
    assert "per_client" not in row and row["labels"]["num_classes"] == 3
    full = json.loads(json.dumps(to_jsonable(stats, per_client=True)))
    assert full["per_client"]["sizes"] == [2, 4, 6]


def _assert_png(path):
    data = open(path, "rb").read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_writes_a_png(tmp_path):
    _assert_png(plot_description(_tiny(), str(tmp_path / "tiny.png"), sort="size"))
    # More clients than rows: sorted clients are pooled into max_rows rows.
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 20, 500)
    y = rng.integers(0, 30, int(sizes.sum()))
    many = FederatedData({"y": y}, np.concatenate([[0], np.cumsum(sizes)]),
                         tuple(str(i) for i in range(500)))
    _assert_png(plot_description(many, str(tmp_path / "many.png"), max_rows=50))
    _assert_png(plot_description(_tiny(), str(tmp_path / "sizes.png"), label_key=None))
    with pytest.raises(UserError, match="does not exist"):
        plot_description(_tiny(), str(tmp_path / "missing" / "x.png"))


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UserError, match=r'pip install "fedjax_sim\[plot\]"'):
        plot_description(_tiny(), str(tmp_path / "x.png"))


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_describes_digits_and_writes_the_default_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS)
    assert code == 0, err
    assert "100 clients" in out and "non-IID" in out
    assert "client test   100 clients" in out and "pooled test   360 examples" in out
    assert "wrote digits_fedavg_clients.png" in out
    _assert_png(tmp_path / "digits_fedavg_clients.png")


def test_cli_json_with_overrides(tmp_path, capsys):
    png = tmp_path / "split.png"
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--json",
                          "--config.data.num_clients=20", "--config.clients_per_round=5",
                          "--png", str(png), "--sort", "size")
    assert code == 0, err
    row = json.loads(out)
    assert row["train"]["num_clients"] == 20 and row["train"]["labels"]["num_classes"] == 10
    assert 0.0 < row["train"]["labels"]["label_tv"]["mean"] < 1.0
    assert row["pooled_test"]["num_examples"] == 360 and row["png"] == str(png)
    _assert_png(png)


def test_cli_regression_config_reports_sizes_only(capsys):
    code, out, err = _run(capsys, "data", "describe", "--config",
                          os.path.join(ROOT, "configs", "diabetes_fedsgd.py"), "--no-png")
    assert code == 0, err
    assert "client size" in out and "labels" not in out and "wrote" not in out


def test_cli_errors_exit_2(tmp_path, capsys):
    code, out, err = _run(capsys, "data", "describe", "--config", str(tmp_path / "nope.py"))
    assert code == 2 and err.startswith("error: ") and "does not exist" in err
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--no-png",
                          "--config.data.num_clients=0")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_iid_reference_tv_shrinks_with_client_size():
    rng = np.random.default_rng(1)
    small = FederatedData({"y": rng.integers(0, 10, 200)}, np.arange(0, 201, 10),
                          tuple(str(i) for i in range(20)))
    large = FederatedData({"y": rng.integers(0, 10, 20000)}, np.arange(0, 20001, 1000),
                          tuple(str(i) for i in range(20)))
    tv_small, tv_large = (describe(d)["labels"]["label_tv"] for d in (small, large))
    assert tv_small["iid_mean"] > 0.2 and tv_large["iid_mean"] < 0.05
    # Labels drawn IID: the measured TV is close to its IID reference.
    assert tv_small["mean"] == pytest.approx(tv_small["iid_mean"], abs=0.05)
    assert tv_large["mean"] == pytest.approx(tv_large["iid_mean"], abs=0.01)
    one_class = FederatedData({"y": np.zeros(6, np.int64)}, np.array([0, 2, 6]), ("a", "b"))
    assert describe(one_class)["labels"]["label_tv"] == {"mean": 0.0, "p50": 0.0, "max": 0.0,
                                                         "iid_mean": 0.0}


def test_cli_png_into_an_existing_directory(tmp_path, capsys):
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--png", str(tmp_path))
    assert code == 0, err
    png = tmp_path / "digits_fedavg_clients.png"
    assert f"wrote {png}" in out
    _assert_png(png)


def test_cli_without_matplotlib_prints_the_statistics_then_what_to_install(tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS)
    assert code == 0 and "100 clients" in out and "non-IID" in out and "wrote" not in out
    assert err == ("warning: no plot written to digits_fedavg_clients.png: drawing it needs "
                   "matplotlib; install the plot extra with pip install 'fedjax_sim[plot]', or "
                   "pass --no-png\n")
    assert not os.listdir(tmp_path)
    # Asked for with --png: the statistics, then an error.
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--json", "--png", "x.png")
    assert code == 2 and json.loads(out)["png"] is None
    assert err == ("error: no plot written to x.png: drawing it needs matplotlib; install the "
                   "plot extra with pip install 'fedjax_sim[plot]'\n")


def test_cli_says_how_many_clients_were_held_out(capsys):
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--no-png",
                          "--config.data.heldout_clients=10")
    assert code == 0, err
    assert out.startswith("digits_fedavg.py training data: 90 clients")
    line = next(line for line in out.splitlines() if line.startswith("  held out"))
    assert re.fullmatch(r"  held out      10 clients with \d+ examples and \d+ test examples "
                        r"\(data\.heldout_clients=10\), not among the training clients described "
                        r"above", line), line
    code, out, err = _run(capsys, "data", "describe", "--config", DIGITS, "--no-png", "--json",
                          "--config.data.heldout_clients=0.1")
    row = json.loads(out)
    assert row["train"]["num_clients"] == 90 and row["heldout"]["num_clients"] == 10
    assert row["heldout"]["setting"] == 0.1
    assert row["train"]["num_examples"] + row["heldout"]["num_examples"] == 1148
