"""``trinity plot``: the image is written, each panel has one line per run and labelled axes, and
bad input (not a run, a metric no run logged, a half-written metrics line) is handled."""

from __future__ import annotations

import struct

import pytest
from studio_runs import write_run

from trinity.cli.main import main
from trinity.monitor.jsonl import read_metrics
from trinity.monitor.plot import metrics_figure, run_labels, smooth

pytest.importorskip("matplotlib")  # a dependency of trinity; missing only in a broken install
KEYS = ["critic/rewards/mean", "response_length/mean"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return [write_run(root, "seed0", seed=0), write_run(root, "seed1", seed=1, steps=8)]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_one_image_with_a_panel_per_metric(runs, tmp_path, capsys):
    out = tmp_path / "fig" / "reward.png"
    args = ["plot", *map(str, runs), "-m", KEYS[0], "-m", KEYS[1], "-o", str(out)]
    assert main([*args, "--smoothing", "0.5", "--title", "GRPO"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    width, height = png_size(out)
    assert width == 840 and height > 600  # 7 in wide at 120 dpi; two panels high


def test_each_panel_has_a_line_per_run_and_labelled_axes(runs):
    labels = run_labels(runs)
    assert labels == ["seed0", "seed1"]
    records = {
        label: read_metrics(run / "monitor" / "metrics.jsonl")
        for label, run in zip(labels, runs, strict=True)
    }
    fig = metrics_figure(records, KEYS)
    for ax, key in zip(fig.axes, KEYS, strict=True):
        assert [line.get_label() for line in ax.get_lines()] == labels
        assert [len(line.get_xdata()) for line in ax.get_lines()] == [12, 8]
        assert ax.get_xlabel() == "step" and ax.get_ylabel() == key
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels


def test_smoothing_and_labels():
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3) / 0.75])  # debiased
    assert run_labels(["/a/x/run", "/b/x/run"]) == ["a/x/run", "b/x/run"]


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    assert main(["plot", str(runs[0]), str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"trinity plot: error: {tmp_path} is not a run directory (no monitor/metrics.jsonl)\n"
    )
    assert (
        main(["plot", str(runs[0]), "-m", "critic/reward/mean", "-o", str(tmp_path / "x.png")]) == 2
    )
    assert (
        "'critic/reward/mean' was logged by none of the runs (did you mean 'critic/rewards/mean'?)"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "x.png").exists()


def test_a_half_written_line_is_skipped(tmp_path):
    job = write_run(tmp_path, "torn", steps=3)
    with open(job / "monitor" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "critic/rewards/me')
    out = tmp_path / "torn.svg"
    assert main(["plot", str(job), "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml")
