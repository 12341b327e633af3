"""The steps that the pipeline's commands (cluster/commands/) share: the policy and its prompts, a pool of
generation workers and the reward server for the length of a command, gold-labelled preference pairs,
preference files, reward-model training, scoring groups of samples and the held-out gold evaluation.

Each command starts (or joins) Ray, launches the generation workers it needs from the run config and stops
them when done; models are trained in the command's own process (submit it with
`ray job submit --entrypoint-num-gpus 1 ...` to train on a GPU node).
"""

from __future__ import annotations

import json
import logging
import random
import statistics
from contextlib import contextmanager
from pathlib import Path

from actors.reference import ReferenceModel
from actors.worker_pool import WorkerPool, sample
from cluster.launch import launch_pool, start_ray
from cluster.models import resolve_model
from core import storage
from core.preferences import PreferenceDataError, PreferencePair, load_preferences, split_pairs
from core.progress import Progress
from core.prompts import Prompt, load_prompts
from core.rollout import Rollout
from core.rollout_records import RolloutRecords, best_against_worst, load_scored, tokenizer_id
from learner.evaluation import kl_per_reply
from learner.reward_model import RewardModelTrainer
from reward_server.client import RewardClient
from reward_server.scorers import make_scorer, score_checked
from reward_server.west_of_n import Candidate, mean_logprob

log = logging.getLogger(__name__)


def policy_prompts(cfg) -> tuple[str, list[Prompt], list[Prompt]]:
    """(model path, training prompts, held-out prompts) of the run config's policy and data."""
    from transformers import AutoTokenizer

    model_path = resolve_model(cfg.model.path)
    train, held_out = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    return model_path, train, held_out


@contextmanager
def generation_workers(cfg, model_path: str):
    """A pool of `generation.num_workers` workers of the policy at `model_path`, stopped on exit."""
    start_ray(cfg.train)
    pool = launch_pool(cfg, model_path)
    try:
        yield pool
    finally:
        pool.shutdown()


@contextmanager
def reward_server(reward_cfg):
    """The reward server on Serve, as the retrying client that training uses; shut down on exit."""
    from ray import serve

    from reward_server.server import APP_NAME, start_reward_server

    try:
        yield RewardClient(reward_cfg, APP_NAME, start_reward_server(reward_cfg))
    finally:
        serve.shutdown()


def cycle(prompts: list[Prompt], count: int, seed: int) -> list[Prompt]:
    """`count` prompts: the list shuffled by `seed`, repeated as often as needed."""
    order = list(prompts)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(count)]


def scored_rows(texts: list[str], rollouts: list[Rollout], scores: list[float]) -> list[dict]:
    """The rows a rollouts folder holds (core/rollout_records.py) of sampled replies and their scores."""
    return [{"prompt": text, "response": r.text, "reward": score, "version": r.version, "finished": r.finished,
             "prompt_ids": r.prompt_ids, "response_ids": r.response_ids}
            for text, r, score in zip(texts, rollouts, scores)]


def keep_scored(output_dir: str, model_path: str, rows: list[dict], setting: str) -> None:
    """Write `rows` as the one part of the rollouts folder `<output_dir>/rollouts` (replacing what was there),
    for `rlhf ilql`, filtered SFT or DPO on scored replies (the command's `setting` asked for it)."""
    from transformers import AutoTokenizer

    records = RolloutRecords(output_dir, storage.basename(output_dir), model_path,
                             tokenizer_id(AutoTokenizer.from_pretrained(model_path)))
    records.drop_after(0)
    records.write(1, rows)
    print(f"{setting}: {len(rows)} scored replies kept in {records.location}", flush=True)


def label_pairs(prompts: list[Prompt], groups: list[list[Rollout]], labeller,
                min_margin: float, kept: list[dict] | None = None) -> tuple[list[PreferencePair], list[dict], int]:
    """Pairs from the first two responses of each group, the one the labeller scores higher chosen.
    Pairs whose scores differ by less than `min_margin`, or whose texts are equal, carry no preference
    and are dropped. Returns (pairs, per-pair label columns, ties dropped); `kept` gets every scored reply's row
    (`scored_rows`), ties included."""
    firsts = [g[:2] for g in groups if len(g) >= 2]
    texts = [p.text for p, g in zip(prompts, groups) if len(g) >= 2]
    scores = score_checked(labeller, [t for t in texts for _ in (0, 1)], [r.text for g in firsts for r in g])
    if kept is not None:
        kept += scored_rows([t for t in texts for _ in (0, 1)], [r for g in firsts for r in g], scores)
    pairs, extra = [], []
    for text, (a, b), sa, sb in zip(texts, firsts, scores[0::2], scores[1::2]):
        if abs(sa - sb) < min_margin or a.text.strip() == b.text.strip():
            continue
        (win, s_win), (lose, s_lose) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
        pairs.append(PreferencePair(prompt=text, chosen=win.text, rejected=lose.text,
                                    chosen_finished=win.finished, rejected_finished=lose.finished))
        extra.append({"chosen_score": s_win, "rejected_score": s_lose, "flipped": False,
                      "chosen_finished": win.finished, "rejected_finished": lose.finished})
    return pairs, extra, len(firsts) - len(pairs)


def flip_labels(pairs: list[PreferencePair], extra: list[dict], fraction: float, seed: int) -> int:
    """Swap chosen and rejected in exactly round(`fraction` * len(pairs)) pairs picked by `seed`, in place:
    annotators agree with each other only 60-75% of the time (Ouyang et al. 2022 report ~73%), so a
    preference set labelled without noise would flatter the reward model. Returns how many were flipped."""
    flips = random.Random(seed).sample(range(len(pairs)), round(fraction * len(pairs)))
    for i in flips:
        pair, e = pairs[i], extra[i]
        pairs[i] = PreferencePair(prompt=pair.prompt, chosen=pair.rejected, rejected=pair.chosen,
                                  chosen_finished=pair.rejected_finished, rejected_finished=pair.chosen_finished)
        extra[i] = {"chosen_score": e["rejected_score"], "rejected_score": e["chosen_score"], "flipped": True,
                    "chosen_finished": e.get("rejected_finished", True), "rejected_finished": e.get("chosen_finished", True)}
    return len(flips)


def gold_pairs(pool: WorkerPool, prompts: list[Prompt], count: int, labeller, flip_fraction: float,
               min_margin: float, seed: int, label: str = "preference pairs", kept: list[dict] | None = None
               ) -> tuple[list[PreferencePair], list[dict]]:
    """`count` labelled pairs of two fresh responses each (sampling again for the ties dropped), then
    `flip_fraction` of them flipped; `kept` gets every labelled reply's row, unflipped (`label_pairs`)."""
    pairs, extra, round_ = [], [], 0
    while len(pairs) < count:
        # Ties are dropped, so ask for a quarter more than still needed.
        want = max(8, int((count - len(pairs)) * 1.25))
        chosen = cycle(prompts, want, seed + round_)
        groups = sample(pool, chosen, 2, label=label)
        new, new_extra, ties = label_pairs(chosen, groups, labeller, min_margin, kept)
        log.info("%s: %d pairs, %d ties dropped", label, len(new), ties)
        pairs, extra, round_ = pairs + new, extra + new_extra, round_ + 1
        if round_ > 20 and len(pairs) < count:
            raise RuntimeError(f"{label}: after 20 rounds of sampling only {len(pairs)} of {count} pairs are not "
                               f"ties; lower preferences.min_margin or use a more varied policy")
    pairs, extra = pairs[:count], extra[:count]
    flipped = flip_labels(pairs, extra, flip_fraction, seed)
    log.info("%s: %d pairs, %d labels flipped", label, len(pairs), flipped)
    return pairs, extra


def load_pair_sets(pc) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs of a PreferenceConfig; skipped bad rows are counted in the log."""
    if not pc.path:
        raise PreferenceDataError("preferences.path is empty: give a preference file (explicit or conversation "
                                  "form), or make one with `rlhf make-preferences`")

    def read(path):
        if pc.form == "scored":
            replies, skipped = load_scored(path, (pc.prompt_column, pc.response_column, pc.reward_column), None,
                                           pc.on_bad_row, "preferences.on_bad_row")
            pairs = best_against_worst(replies, pc.min_margin)
            if not pairs:
                raise PreferenceDataError(f"{path}: no prompt has two replies whose rewards differ by "
                                          f"preferences.min_margin = {pc.min_margin} or more; the scored form pairs "
                                          f"each prompt's best reply with its worst")
            log.info("%s: %d best-against-worst pairs from %d scored replies (%d rows skipped)", path, len(pairs),
                     len(replies), len(skipped))
            return pairs
        found = load_preferences(path, form=pc.form, prompt_column=pc.prompt_column, chosen_column=pc.chosen_column,
                                 rejected_column=pc.rejected_column, on_bad_row=pc.on_bad_row)
        if found.skipped:
            log.warning("%s: skipped %d bad rows (preferences.on_bad_row=skip), e.g. %s", path, len(found.skipped),
                        "; ".join(found.skipped[:3]))
        return found.pairs

    if pc.eval_path:
        return read(pc.path), read(pc.eval_path)
    return split_pairs(read(pc.path), pc.eval_fraction, pc.seed)


def train_reward_model(cfg, train_pairs: list[PreferencePair], eval_pairs: list[PreferencePair],
                       output_dir: str) -> tuple[RewardModelTrainer, list[dict]]:
    """Train a reward model on the pairs, save it to `output_dir` with its per-epoch metrics (`history.json`)."""
    log.info("training a reward model on %d pairs (%d held out) -> %s", len(train_pairs), len(eval_pairs), output_dir)
    trainer = RewardModelTrainer(resolve_model(cfg.rm.base, "rm.base"), cfg.rm)
    history = trainer.train(train_pairs, eval_pairs)
    trainer.save(output_dir)
    (Path(output_dir) / "history.json").write_text(json.dumps(history, indent=1))
    return trainer, history


def score_groups(scorer, prompts: list[Prompt], groups: list[list[Rollout]], slice_size: int = 256
                 ) -> list[list[float]]:
    """The scorer's reward of every response, grouped like `groups` (scored in slices, with a progress line)."""
    flat = [(p.text, r.text) for p, g in zip(prompts, groups) for r in g]
    progress, scores = Progress(f"scoring with {scorer!r}", len(flat), "responses"), []
    for start in range(0, len(flat), slice_size):
        part = flat[start:start + slice_size]
        scores += score_checked(scorer, [p for p, _ in part], [r for _, r in part], first_index=start)
        progress.advance(len(part))
    rewards = iter(scores)
    return [[next(rewards) for _ in g] for g in groups]


def west_of_n_candidates(prompts: list[Prompt], groups: list[list[Rollout]],
                         scores: list[list[float]]) -> list[tuple[str, list[Candidate]]]:
    """West-of-N's candidates: each prompt's samples with their scores and mean policy log-probs."""
    return [(p.text, [Candidate(r.text, s, mean_logprob(r)) for r, s in zip(g, gs)])
            for p, g, gs in zip(prompts, groups, scores)]


def pick_best(scores: list[list[float]], n: int) -> list[int]:
    """Per prompt, the index (among its first `n` responses) of the highest-scored one; first wins ties."""
    return [max(range(min(n, len(s))), key=lambda i: s[i]) for s in scores]


@contextmanager
def stage_run(cfg, stage: str):
    """The metrics of a command that trains in its own process (`rlhf sft|dpo|ilql`): metrics.jsonl and a W&B
    run (`train.wandb_mode`, offline by default) in `<stage>.output_dir`, closed with the dict the block fills in
    as its summary (or abandoned when the block raises)."""
    from learner.metrics import RunLogger

    logger = RunLogger(getattr(cfg, stage).output_dir, cfg.to_dict(), cfg.train.wandb_mode, cfg.train.wandb_project)
    summary: dict = {}
    try:
        yield logger, summary
    except BaseException:
        logger.abandon()
        raise
    logger.close(summary)


def train_policy(cfg, stage: str, make, train: list, held_out: list, logger=None):
    """(trainer, history) of `<stage>`'s trainer built by `make` (learner/trainer_group.py: in this process, or on
    `<stage>.num_learners` ranks, Ray started for them)."""
    from learner.trainer_group import train_stage

    return train_stage(make, ranks_ready(cfg, stage), train, held_out, logger)


def ranks_ready(cfg, stage: str):
    """`<stage>`'s config section, with Ray started when the stage trains on several ranks."""
    section = getattr(cfg, stage)
    if section.num_learners > 1:
        start_ray(cfg.train)
    return section


def held_out_gold(cfg, model_path: str, label: str, kl_to: str = "") -> dict[str, float]:
    """The held-out evaluation of a PPO job (learner/evaluation.py) of the policy at `model_path`: its gold
    reward (`eval/gold_reward_mean`), reply length and share of finished replies; with `kl_to` (the starting
    policy's path) also the KL to it, as the job reports it (`eval/kl_mean`: the sum over each reply of
    log pi - log pi_start at the evaluation's temperature, pi's log-probs those vLLM sampled with)."""
    judged = held_out_judged(cfg, model_path, label)
    figures = judged.figures()
    if kl_to:
        rollouts = judged.rollouts
        start = ReferenceModel(kl_to, cfg.reference, dtype=cfg.ppo.dtype, autocast=cfg.ppo.autocast)
        start_logprobs = start.ref_logprobs([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                                            cfg.train.eval_temperature)
        figures["eval/kl_mean"] = statistics.mean(kl_per_reply(rollouts, start_logprobs))
    return figures


def held_out_judged(cfg, model_path: str, label: str):
    """The held-out samples of the policy at `model_path`, judged by the gold scorer (`HeldOut`)."""
    from learner.evaluation import judge_held_out

    _, _, held_out = policy_prompts(cfg)
    with generation_workers(cfg, model_path) as pool:
        return judge_held_out(pool, held_out, make_scorer(cfg.train.gold_scorer), cfg.train.eval_samples,
                              cfg.train.eval_temperature, label=f"{label} samples")
