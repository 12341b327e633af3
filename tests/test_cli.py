"""The shape of the `rlhf` command: every subcommand in `rlhf --help` with one line, settings as config fields
(outputs in <section>.output_dir, counts as fields, the job's address and namespace from train.*), and the
spellings of earlier releases still working, with a line that says what replaced them."""

import subprocess
import sys

import pytest

from cluster import cli
from cluster.commands import COMMANDS
from tests.helpers import COMMAND_LINES, TINY

pytestmark = pytest.mark.pure


def test_help_lists_every_command_with_one_line_each():
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    listing = done.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in listing] == COMMANDS
    assert all(len(line) <= 120 for line in listing)
    # the modules on disk are the commands listed
    from pathlib import Path

    modules = {p.stem.replace("_", "-") for p in (Path(cli.__file__).parent / "commands").glob("*.py")
               if p.stem != "__init__"}
    assert modules == set(COMMANDS)


def test_every_command_that_reads_a_config_is_checked_for_bad_input():
    assert {line[0] for line in COMMAND_LINES} == set(COMMANDS) - {"prepare-model"}


def called(monkeypatch, module: str, function: str) -> list:
    """Calls of `module.function`, recorded instead of run."""
    import importlib

    calls = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda *args: calls.append(args))
    return calls


def test_outputs_go_to_the_sections_output_dir(monkeypatch, tmp_path):
    demos = called(monkeypatch, "cluster.commands.make_demos", "make_demos")
    pairs = called(monkeypatch, "cluster.commands.make_preferences", "make_preferences")
    assert cli.main(["make-demos", "--config", str(TINY), f"sft.output_dir={tmp_path}/sft"]) == 0
    assert cli.main(["make-preferences", "--config", str(TINY), f"preferences.output_dir={tmp_path}/p"]) == 0
    assert demos[0][1] == f"{tmp_path}/sft/demos.jsonl" and pairs[0][1] == f"{tmp_path}/p/pairs.jsonl"


def test_earlier_spellings_still_work_and_say_what_replaced_them(monkeypatch, capsys, tmp_path):
    pairs = called(monkeypatch, "cluster.commands.make_preferences", "make_preferences")
    report = called(monkeypatch, "cluster.commands.rm_report", "report")
    best = called(monkeypatch, "cluster.commands.best_of_n", "best_of_n")
    assert cli.main(["make-preferences", "--config", str(TINY), "--out", f"{tmp_path}/mine.jsonl"]) == 0
    assert pairs[0][1] == f"{tmp_path}/mine.jsonl"
    assert "--out is deprecated" in capsys.readouterr().err
    assert cli.main(["rm-report", "--config", str(TINY), "--pairs", "12", "--eval-pairs", "6", "--out",
                     f"{tmp_path}/r"]) == 0
    (cfg,) = report[0]
    assert (cfg.rm_report.pairs, cfg.rm_report.eval_pairs, cfg.rm_report.output_dir) == (12, 6, f"{tmp_path}/r")
    err = capsys.readouterr().err
    assert "write rm_report.pairs=12 instead" in err and "write rm_report.output_dir=" in err
    assert cli.main(["best-of-n", "--config", str(TINY), "--n", "4", "--prompt", "My bus was late."]) == 0
    assert best[0][0].best_of_n.n == 4 and best[0][1] == ["My bus was late."]
    assert "write best_of_n.n=4 instead" in capsys.readouterr().err
    # a count out of range is refused as a field, whichever spelling set it
    assert cli.main(["best-of-n", "--config", str(TINY), "--n", "0"]) == 2
    assert "best_of_n.n = 0 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("flags, address, namespace", [
    ([], "", "rlhf"),
    (["train.ray_namespace=mine", "train.ray_address=10.0.0.1:6379"], "10.0.0.1:6379", "mine"),
    (["--namespace", "theirs", "--address", "auto", "train.ray_namespace=mine"], "auto", "theirs"),
])
def test_a_running_job_is_found_where_its_config_says_unless_a_flag_says_otherwise(monkeypatch, capsys, flags,
                                                                                   address, namespace):
    import ray

    import cluster.control

    class Control:
        get_status = scale = type("Method", (), {"remote": staticmethod(lambda *args: {"workers": 2})})

    found = []
    monkeypatch.setattr(cluster.control, "find_control", lambda *where: found.append(where) or Control)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    assert cli.main(["status", *flags]) == 0
    assert cli.main(["scale", "--workers", "3", *flags]) == 0
    assert found == [(address, namespace)] * 2
    assert f"asked the job in namespace {namespace!r} for 3 generation workers" in capsys.readouterr().out


def test_elo_refuses_a_run_without_checkpoints_by_name(tmp_path, capsys):
    assert cli.main(["elo", "--config", str(TINY), "--run", str(tmp_path)]) == 2
    assert f"--run {tmp_path} holds no complete checkpoint" in capsys.readouterr().err
    assert cli.main(["elo", "--config", str(TINY), "--player", f"mine={tmp_path}"]) == 2
    assert f"--player mine='{tmp_path}' holds no config.json" in capsys.readouterr().err
