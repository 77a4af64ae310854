"""What the harness's figures and progress display show: step axes a reader can read, slopes with units,
and progress without tqdm."""

from __future__ import annotations

import builtins

import pytest

from mpnode.bench import experiment, plots
from mpnode.bench.runner import BenchRow

pytest.importorskip("matplotlib")


def test_label_steps_gives_one_plain_tick_per_step_count():
    plt = experiment.pyplot()
    fig, ax = plt.subplots()
    steps = [32, 128, 512, 2048, 8192]
    ax.loglog(steps, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], "o-")
    experiment.label_steps(ax, steps)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    minor = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)
    assert labels == ["32", "128", "512", "2048", "8192"] and minor == []


def test_steps_figure_states_the_unit_of_each_slope(tmp_path, monkeypatch):
    """time grows 2 ms per step and held memory 3 KiB per step: the legends say so, with units."""
    rows = [BenchRow(suite="s", problem="mlp", axis="steps", sizes="batch=4", steps=n, impl="mpnode/float32",
                     solver="mpnode", precision="float32", device="cpu", time_s=0.01 + 0.002 * n,
                     held_bytes=1000 + 3 * 1024 * n) for n in (4, 8, 16)]
    legends = []

    def capture(fig, path, dpi=110):
        legends.extend(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["4", "8", "16"]
        experiment.pyplot().close(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", capture)
    plots.plot_all(rows, tmp_path)
    assert legends == ["mpnode/float32 (slope 2 ms/step)", "mpnode/float32 (slope 3.00 KiB/step)"]


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_yields_every_item_with_or_without_tqdm(tqdm_installed, monkeypatch, capsys):
    if tqdm_installed:
        pytest.importorskip("tqdm")
    else:
        real_import = builtins.__import__

        def no_tqdm(name, *args, **kwargs):
            if name == "tqdm" or name.startswith("tqdm."):
                raise ImportError("No module named 'tqdm'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_tqdm)
    assert list(experiment.progress(list(range(25)), desc="solves", unit="solve")) == list(range(25))
    err = capsys.readouterr().err
    if not tqdm_installed:
        assert err.splitlines()[0] == "solves: 2/25 solve" and err.splitlines()[-1] == "solves: 25/25 solve"
