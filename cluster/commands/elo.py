"""`rlhf elo`: rate policies against each other. Each policy (the base `model.path`, every checkpoint of the
runs given, the named model directories) answers `elo.num_prompts` held-out prompts, one sample each at
`train.eval_temperature`; every two play a match on every prompt, decided by `elo.judge`. Prints the ratings
with 95% intervals and the win-rate matrix, writes ratings.json and ratings.png (rating against training
step) to `elo.output_dir`."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.commands import config_arguments, load, staged_output
from core.config import ConfigError
from core.specs import model_dir_problem

HELP = "Elo ratings of policies (a run's checkpoints, the base, model directories) on held-out prompts"


def add_arguments(parser) -> None:
    config_arguments(parser)
    parser.add_argument("--run", action="append", default=[], help="a run's output_dir: every checkpoint is a "
                        "player (repeatable)")
    parser.add_argument("--player", action="append", default=[], help="NAME=DIR: an HF model directory "
                        "(repeatable)")


def run(args) -> None:
    cfg = load(args)
    players = [("base", 0, cfg.model.path, "base"), *run_players(args.run), *named_players(args.player)]
    if len(players) < 2:
        raise ConfigError("rlhf elo needs at least one policy besides the base: give --run DIR or --player NAME=DIR")
    with staged_output(cfg, "elo") as staged:
        elo(staged, players)


def named_players(specs: list[str]) -> list[tuple[str, int, str, str]]:
    """(name, 0, model directory, name) of each NAME=DIR."""
    players = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"--player {spec!r} must be NAME=DIR, DIR an HF model directory")
        if problem := model_dir_problem(path, "a player"):
            raise ConfigError(f"--player {name}={problem}")
        players.append((name, 0, path, name))
    return players


def run_players(runs: list[str]) -> list[tuple[str, int, str, str]]:
    """(name@step, training step, policy directory, run name) of every complete checkpoint of each run."""
    from cluster.checkpoint import complete_checkpoints
    from core import storage

    players = []
    for run_dir in runs:
        if storage.is_uri(run_dir):
            raise ConfigError(f"--run {run_dir}: rate runs on a local or mounted path (the players are loaded by "
                              f"vLLM from a directory); copy the run's checkpoints/ down first")
        found = complete_checkpoints(run_dir)
        if not found:
            raise ConfigError(f"--run {run_dir} holds no complete checkpoint (checkpoints/step-*/ with meta.json); "
                              f"rate a run that saved some (train.checkpoint_every), or name model directories "
                              f"with --player")
        for path in found:
            step = json.loads((Path(path) / "meta.json").read_text())["step"]
            players.append((f"{Path(run_dir).name}@{step}", step, str(Path(path) / "policy"), Path(run_dir).name))
    return players


def elo(cfg, players: list[tuple[str, int, str, str]]) -> dict:
    from actors.worker_pool import sample
    from cluster.models import resolve_model
    from cluster.pipeline import cycle, generation_workers, policy_prompts
    from reward_server.ratings import Ladder, make_judge

    ec = cfg.elo
    _, _, held_out = policy_prompts(cfg)
    prompts = cycle(held_out, ec.num_prompts, ec.seed)
    ladder = Ladder(make_judge(ec.judge, cfg.train.gold_scorer, cfg.reward.scorer), [p.text for p in prompts])
    for name, step, path, series in players:
        with generation_workers(cfg, resolve_model(path) if name == "base" else path) as pool:
            groups = sample(pool, prompts, 1, cfg.train.eval_temperature, label=f"{name} responses")
        ladder.add(name, step, [g[0].text for g in groups], series)
    printed, result = ladder.write(ec.output_dir, ec.bootstrap, ec.seed)
    print(f"\n{result['matches']} matches on {len(prompts)} held-out prompts, judged by {result['judge']}\n")
    print(printed)
    print(f"\nratings in {ec.output_dir}/ratings.json, plot in {ec.output_dir}/ratings.png")
    return result
