"""This project's PPO job against TRL's GRPOTrainer on the default demo's task, side by side on this machine
(prints figures; not a test).

Both train the same model (`model.path`, the embedded SmolLM2 by default) on the same training prompts with
the same reward (VADER's compound score of the reply) at the same batch: 64 completions of at most 48
tokens per policy update (TRL: 16 prompts x 4 completions, generated with HF `generate` since its vLLM modes
need CUDA, then 4 optimizer steps of 16; this project: the run config's batch, 16 x 4 by default), on the same
CPU threads, weight dtype and autocast as the job's learner (`ppo.*`). Each side runs `--rounds` updates; the first is a
warm-up and the median of the rest is compared, as completions per second.

    .venv/bin/pip install 'trl==1.16.0'            # not a dependency of the project
    .venv/bin/python bench/trl_grpo.py --rounds 4
    .venv/bin/python bench/trl_grpo.py --rounds 4 --beta 0.05 generation.dtype=float32 ppo.autocast=none
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from benchmark import run_job  # bench/, this script's own folder

from cluster.commands import DEFAULT_CONFIG
from cluster.models import resolve_model
from core.config import load_config
from core.prompts import load_prompts
from reward_server.scorers import make_scorer

COMPLETIONS, GENERATIONS, MINIBATCH = 64, 4, 16  # per TRL update: 16 prompts x 4 completions, steps of 16


def run_trl(cfg, model_path: str, prompts: list[str], rounds: int, beta: float) -> list[float]:
    """Seconds of each of `rounds` TRL GRPO updates (one generation of 64 completions and its 4 steps)."""
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install 'trl==1.16.0'") from None
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    vader = make_scorer("vader")

    def vader_reward(prompts, completions, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return vader.score([""] * len(texts), texts)

    class RoundClock(TrainerCallback):
        def __init__(self):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % steps == 0:
                self.marks.append(time.perf_counter())

    torch.set_num_threads(cfg.ppo.threads)
    # One generation of 64 completions serves 4 optimizer steps of 16 (no gradient accumulation), as in the
    # job; TRL's default (steps_per_generation = gradient_accumulation_steps) would instead make one step of 64.
    steps = COMPLETIONS // MINIBATCH
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
            steps_per_generation=steps, num_generations=GENERATIONS,
            max_completion_length=cfg.generation.max_new_tokens,
            temperature=cfg.generation.temperature, learning_rate=cfg.ppo.lr, beta=beta,
            max_steps=rounds * steps, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=cfg.ppo.device == "cpu", bf16=cfg.ppo.autocast == "bfloat16", dataloader_num_workers=0, seed=0)
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
        clock = RoundClock()
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.ppo.dtype))
        trainer = GRPOTrainer(model=model, reward_funcs=vader_reward, args=args, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[clock])
        clock.marks = [time.perf_counter()]
        trainer.train()
    return [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def job_seconds(config: str, overrides: list[str], rounds: int) -> tuple[list[float], int]:
    """Step seconds of `rounds` steps of this project's job (no evaluation), and its completions per step."""
    cfg, _, rows = run_job(config, overrides, rounds)
    steps = [r["timing/step"] for r in rows if "timing/step" in r]
    return steps, cfg.train.prompts_per_step * cfg.generation.samples_per_prompt


def rate(seconds: list[float], completions: int) -> tuple[float, float]:
    """(median seconds per update after the warm-up one, completions per second)."""
    median = statistics.median(seconds[1:] or seconds)
    return median, completions / median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--rounds", type=int, default=4, help="updates on each side; the first is a warm-up")
    parser.add_argument("--beta", type=float, default=0.0,
                        help="TRL's KL coefficient (its default 0 loads no reference model; >0 adds one)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["trl", "job"])
    parser.add_argument("overrides", nargs="*", help="run-config overrides for this project's job")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    model_path = resolve_model(cfg.model.path)
    from transformers import AutoTokenizer

    train_prompts, _ = load_prompts(cfg.data, AutoTokenizer.from_pretrained(model_path))
    figures = {}
    if "job" not in args.skip:
        seconds, completions = job_seconds(args.config, args.overrides, args.rounds)
        figures["this project (rlhf train)"] = (*rate(seconds, completions), completions)
    if "trl" not in args.skip:
        seconds = run_trl(cfg, model_path, [p.text for p in train_prompts], args.rounds, args.beta)
        figures[f"TRL GRPOTrainer (beta {args.beta:g})"] = (*rate(seconds, COMPLETIONS), COMPLETIONS)
    print(f"\nmodel {cfg.model.path}, {cfg.generation.max_new_tokens} tokens at most, learner {cfg.ppo.dtype} on "
          f"{cfg.ppo.threads} threads, median of updates 2..{args.rounds}:")
    for name, (median, per_s, completions) in figures.items():
        print(f"  {name:32s} {completions} completions per update, {median:6.1f} s an update, {per_s:.2f} completions/s")
    if len(figures) == 2:
        (_, (_, ours, _)), (_, (_, theirs, _)) = figures.items()
        print(f"  ratio (this project / TRL): {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
