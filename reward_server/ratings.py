"""Ratings of policies from pairwise matches: Bradley-Terry maximum likelihood on the Elo scale, with
bootstrap intervals, the win-rate matrix, the judges that decide matches, and the ratings' table and plot.

A match is (i, j, s): player i against player j on one prompt, s the share of the match i won (1 a win,
0 a loss, 0.5 a tie, or a judge's probability that i's response is better). Bradley-Terry models
P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400)); the ratings that maximise the likelihood of all matches
at once do not depend on the order the matches were played in (unlike Elo's online updates). They are
found by Hunter's (2004) minorise-maximise iteration and anchored so that the first player (the base
policy) is at 1000. The 95% intervals come from refitting on matches resampled with replacement.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from core.specs import load_function
from reward_server.scorers import ScoringError, make_scorer, score_checked

ELO_SCALE = 400.0 / math.log(10.0)  # rating points per unit of the Bradley-Terry log-strength
ANCHOR = 1000.0


def win_matrix(matches: list[tuple[int, int, float]], players: int) -> tuple[np.ndarray, np.ndarray]:
    """(wins[i, j]: i's summed shares against j, games[i, j]: matches between i and j)."""
    wins, games = np.zeros((players, players)), np.zeros((players, players))
    for i, j, s in matches:
        wins[i, j] += s
        wins[j, i] += 1.0 - s
        games[i, j] += 1
        games[j, i] += 1
    return wins, games


def bradley_terry(matches: list[tuple[int, int, float]], players: int, iterations: int = 2000,
                  prior: float = 0.01) -> np.ndarray:
    """Maximum-likelihood ratings (Elo scale, player 0 at 1000). `prior` adds that share of a win and of a
    loss against every other player (a weak pull towards equal strength), so that a player who won or lost
    every match still has a finite rating."""
    if players == 1:
        return np.array([ANCHOR])
    wins, games = win_matrix(matches, players)
    off_diagonal = 1.0 - np.eye(players)
    wins, games = wins + prior * off_diagonal, games + 2 * prior * off_diagonal
    strength = np.ones(players)
    for _ in range(iterations):
        total = wins.sum(axis=1)
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = total / denominator
        updated /= math.exp(np.log(updated).mean())
        if np.max(np.abs(updated - strength)) < 1e-12:
            strength = updated
            break
        strength = updated
    ratings = ELO_SCALE * np.log(strength)
    return ratings - ratings[0] + ANCHOR


def bootstrap_intervals(matches: list[tuple[int, int, float]], players: int, rounds: int = 200,
                        seed: int = 0) -> np.ndarray:
    """(players, 2): the 2.5th and 97.5th percentiles of each rating over `rounds` refits on the matches
    resampled with replacement."""
    rng = random.Random(seed)
    fits = np.array([bradley_terry(rng.choices(matches, k=len(matches)), players) for _ in range(rounds)])
    return np.percentile(fits, [2.5, 97.5], axis=0).T


def win_rates(matches: list[tuple[int, int, float]], players: int) -> np.ndarray:
    """rates[i, j]: the share of its matches against j that i won (NaN where they did not meet)."""
    wins, games = win_matrix(matches, players)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(games > 0, wins / np.maximum(games, 1), np.nan)


# --- judges and matches --------------------------------------------------------------------------


class ScoreJudge:
    """A match judged by a pointwise scorer (reward_server/scorers.py): the higher-scored response wins,
    equal scores tie. Each list of responses is scored once, however many matches it plays."""

    def __init__(self, scorer):
        self.scorer = scorer
        self._scores: dict[tuple[str, ...], list[float]] = {}

    def _scored(self, prompts: list[str], responses: list[str]) -> list[float]:
        key = tuple(prompts) + tuple(responses)
        if key not in self._scores:
            self._scores[key] = score_checked(self.scorer, prompts, responses)
        return self._scores[key]

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        return [0.5 if x == y else float(x > y) for x, y in zip(self._scored(prompts, a), self._scored(prompts, b))]

    def __repr__(self) -> str:
        return f"ScoreJudge({self.scorer!r})"


class PairwiseJudge:
    """A match judged by a function `f(prompt, a, b) -> probability that a is the better response`, named
    `module.path:function`."""

    def __init__(self, spec: str):
        self.spec = spec
        self._function = load_function(spec)  # the same import and checks as a function scorer

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        out = []
        for k, (prompt, x, y) in enumerate(zip(prompts, a, b)):
            p = self._function(prompt, x, y)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:  # NaN fails both comparisons
                raise ScoringError(f"pairwise judge {self.spec} returned {p!r} for match {k} (prompt "
                                   f"{prompt[:40]!r}); it must return the probability that a is better, in [0, 1]")
            out.append(float(p))
        return out

    def __repr__(self) -> str:
        return f"PairwiseJudge({self.spec!r})"


def make_judge(spec: str, gold: str, reward: str, device: str = "cpu"):
    """`elo.judge`: `gold` and `reward` name the run's gold and reward scorers; `pairwise:<module>:<function>` a
    pairwise function; anything else is a scorer spec."""
    if spec.startswith("pairwise:"):
        return PairwiseJudge(spec.removeprefix("pairwise:"))
    return ScoreJudge(make_scorer({"gold": gold, "reward": reward}.get(spec, spec), device=device))


def play(prompts: list[str], responses: list[list[str]], judge, against: int | None = None
         ) -> list[tuple[int, int, float]]:
    """Matches on every prompt between every two players (`responses[i]`: player i's response to each
    prompt), or, with `against`, between that player and each of the others."""
    pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))
             if against is None or against in (i, j)]
    matches = []
    for i, j in pairs:
        matches += [(i, j, p) for p in judge(prompts, responses[i], responses[j])]
    return matches


def table(names: list[str], ratings: np.ndarray, intervals: np.ndarray, rates: np.ndarray) -> str:
    """Ratings with their intervals, best first, and the win-rate matrix (row's share of wins against
    column), as `rlhf elo` prints them."""
    order = np.argsort(-ratings)
    width = max(len(n) for n in names)
    lines = [f"{'policy':{width}s}  rating  95% interval (Bradley-Terry ML, bootstrap)"]
    lines += [f"{names[k]:{width}s}  {ratings[k]:6.0f}  [{intervals[k, 0]:.0f}, {intervals[k, 1]:.0f}]" for k in order]
    lines += ["", "win rate (row against column):", " " * width + "  " + "  ".join(f"{n[:8]:>8s}" for n in names)]
    cell = lambda i, j: "       -" if i == j or np.isnan(rates[i, j]) else f"{rates[i, j]:8.2f}"  # noqa: E731
    lines += [f"{names[i]:{width}s}  " + "  ".join(cell(i, j) for j in range(len(names))) for i in range(len(names))]
    return "\n".join(lines)


def plot(path: str, names: list[str], steps: list[int], ratings: np.ndarray, intervals: np.ndarray,
         series: list[str]) -> None:
    """A PNG of rating against training step, one line per series (a run), with the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(series):
        k = sorted((i for i, s in enumerate(series) if s == name), key=lambda i: steps[i])
        spread = [ratings[k] - intervals[k, 0], intervals[k, 1] - ratings[k]]
        ax.errorbar([steps[i] for i in k], ratings[k], yerr=spread, marker="o", capsize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"rating (Bradley-Terry, Elo scale; {names[0]} = {ANCHOR:.0f})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Ladder:
    """Policies rated as they come: each one added answers the same prompts and plays every policy added
    before it on each of them (`rlhf elo` adds them all; a PPO job with `train.elo` adds one per evaluation)."""

    def __init__(self, judge, prompts: list[str]):
        self.judge, self.prompts = judge, prompts
        self.names: list[str] = []
        self.steps: list[int] = []
        self.series: list[str] = []
        self.responses: list[list[str]] = []
        self.matches: list[tuple[int, int, float]] = []

    def add(self, name: str, step: int, responses: list[str], series: str = "") -> float:
        """Add a policy by its responses to the ladder's prompts; returns its rating now."""
        if len(responses) != len(self.prompts):
            raise ValueError(f"{name}: {len(responses)} responses for {len(self.prompts)} prompts")
        self.names.append(name)
        self.steps.append(step)
        self.series.append(series or name)
        self.responses.append(list(responses))
        self.matches += play(self.prompts, self.responses, self.judge, against=len(self.responses) - 1)
        return float(self.ratings()[-1])

    def ratings(self) -> np.ndarray:
        return bradley_terry(self.matches, len(self.names))

    def write(self, out_dir: str, rounds: int = 200, seed: int = 0) -> tuple[str, dict]:
        """(the printed table, the result) with the bootstrap intervals; ratings.json and ratings.png in
        `out_dir`."""
        ratings, players = self.ratings(), len(self.names)
        intervals = bootstrap_intervals(self.matches, players, rounds, seed)
        rates = win_rates(self.matches, players)
        result = {"judge": repr(self.judge), "prompts": len(self.prompts), "matches": len(self.matches),
                  "estimator": "Bradley-Terry maximum likelihood (Elo scale), 95% intervals from a bootstrap "
                               f"of the matches ({rounds} refits)",
                  "players": [{"name": n, "step": s, "rating": float(r), "interval": [float(a), float(b)]}
                              for n, s, r, (a, b) in zip(self.names, self.steps, ratings, intervals)],
                  "win_rates": [[None if x != x else float(x) for x in row] for row in rates]}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ratings.json").write_text(json.dumps(result, indent=1))
        plot(str(out / "ratings.png"), self.names, self.steps, ratings, intervals, self.series)
        return table(self.names, ratings, intervals, rates), result
