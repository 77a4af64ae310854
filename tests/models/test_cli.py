"""mpnode.models.cli: the examples' shared flags, the solver choice, setup and the CSV writer."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

import mpnode.core
from mpnode.models import cli


def _usage_error(parser, argv, capsys) -> str:
    """The message argparse prints when ``argv`` is rejected (it exits with status 2)."""
    with pytest.raises(SystemExit) as done:
        parser.parse_args(argv)
    assert done.value.code == 2
    return capsys.readouterr().err


def test_solver_picks_the_function_of_the_named_package():
    assert cli.solver("mpnode") is mpnode.core.odeint
    assert cli.solver("mpnode", "odeint_event") is mpnode.core.odeint_event
    torchdiffeq = pytest.importorskip("torchdiffeq")
    assert cli.solver("torchdiffeq") is torchdiffeq.odeint
    assert cli.solver("torchdiffeq", "odeint_event") is torchdiffeq.odeint_event


def test_solver_names_the_install_command_when_the_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # the import then fails
    with pytest.raises(SystemExit, match="--odeint torchdiffeq needs torchdiffeq: pip install torchdiffeq"):
        cli.solver("torchdiffeq")


def test_solver_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown solver 'scipy'.*mpnode.*torchdiffeq"):
        cli.solver("scipy")
    with pytest.raises(ValueError, match=r"no function 'odeint_events'.*odeint_event"):
        cli.solver("mpnode", "odeint_events")


def test_script_parser_flags_every_script_takes():
    p = cli.script_parser("demo", "a demo")
    args = p.parse_args([])
    assert (args.out, args.seed, args.smoke) == (Path("outputs/demo"), 0, False)
    assert p.prog == "demo.py"
    args = p.parse_args(["--quick", "--seed", "3", "--out", "elsewhere"])
    assert (args.out, args.seed, args.smoke) == (Path("elsewhere"), 3, True)


def test_solver_flags_with_and_without_device(capsys):
    p = cli.script_parser("demo", "a demo")
    cli.add_solver_flags(p)
    args = p.parse_args(["--precision", "bfloat16", "--odeint", "torchdiffeq", "--device", "cpu"])
    assert (cli.PRECISIONS[args.precision], args.odeint, args.device) == (torch.bfloat16, "torchdiffeq", "cpu")
    assert "invalid choice: 'float64'" in _usage_error(p, ["--precision", "float64"], capsys)
    assert "invalid choice: 'scipy'" in _usage_error(p, ["--odeint", "scipy"], capsys)

    p = cli.script_parser("demo", "a demo")
    cli.add_solver_flags(p, what="the drag network", device=False)
    assert not hasattr(p.parse_args([]), "device")
    assert "autocast dtype of the drag network" in p.format_help()
    cli.add_device_flag(p, help="where the model runs")
    assert "where the model runs" in p.format_help()


def test_method_flags():
    p = cli.script_parser("demo", "a demo")
    cli.add_method_flags(p, steps=8)
    args = p.parse_args(["--method", "dopri5", "--rtol", "1e-3"])
    assert (args.method, args.steps, args.rtol, args.atol) == ("dopri5", 8, 1e-3, 1e-7)

    p = cli.script_parser("demo", "a demo")
    cli.add_method_flags(p, steps=None, rtol=1e-4, atol=1e-6)  # the output times are the grid: no --steps
    args = p.parse_args([])
    assert not hasattr(args, "steps") and (args.method, args.rtol, args.atol) == ("rk4", 1e-4, 1e-6)


def test_number_flags_are_positive_and_typed_like_their_default(capsys):
    p = cli.script_parser("demo", "a demo")
    cli.add_number_flags(p, data_size=1000, lr=1e-3)
    args = p.parse_args([])
    assert (args.data_size, args.lr) == (1000, 1e-3)
    args = p.parse_args(["--data-size", "40", "--lr", "0.5"])
    assert (args.data_size, args.lr) == (40, 0.5) and isinstance(args.data_size, int)
    assert "argument --data-size: 0 is not a positive number" in _usage_error(p, ["--data-size", "0"], capsys)
    assert "argument --lr: -1 is not a positive number" in _usage_error(p, ["--lr=-1"], capsys)
    assert "invalid int value: '2.5'" in _usage_error(p, ["--data-size", "2.5"], capsys)


def test_setup_seeds_creates_the_folder_and_returns_the_device(tmp_path):
    p = cli.script_parser("demo", "a demo")
    args = p.parse_args(["--seed", "5", "--out", str(tmp_path / "a" / "b")])
    assert cli.setup(args) == torch.device("cpu")  # no --device flag: the CPU
    first = torch.rand(3)
    assert (tmp_path / "a" / "b").is_dir()
    cli.add_device_flag(p)
    args = p.parse_args(["--seed", "5", "--out", str(tmp_path / "a" / "b"), "--device", "cpu"])
    assert cli.setup(args) == torch.device("cpu")  # an existing folder is fine
    assert torch.equal(torch.rand(3), first)


def _read(path: Path) -> list[list[str]]:
    with path.open() as fh:
        return list(csv.reader(fh))


def test_write_csv(tmp_path):
    path = tmp_path / "logs" / "log.csv"
    cli.write_csv(path, [dict(it=1, loss=0.5), dict(it=2, loss=None)])
    assert _read(path) == [["it", "loss"], ["1", "0.5"], ["2", ""]]
    cli.write_csv(path, iter([dict(loss=0.25)]), fieldnames=["it", "loss"])  # any iterable; missing keys: empty
    assert _read(path) == [["it", "loss"], ["", "0.25"]]
    with pytest.raises(ValueError, match=r"fields not in fieldnames: .loss."):
        cli.write_csv(tmp_path / "bad.csv", [dict(it=1), dict(it=2, loss=3.0)])
    cli.write_csv(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()
