"""`rlhf sft`: supervised fine-tuning of `model.path` on the demonstrations in `sft.path`, in the command's own
process (submit it with `ray job submit --entrypoint-num-gpus 1 ...` for a GPU). Prints the held-out loss per
epoch, then the held-out gold reward of the base and of the result, and saves an HF directory to
`sft.output_dir` that `model.path` takes."""

from __future__ import annotations

from cluster.commands import config_arguments, load, staged_output

HELP = "supervised fine-tuning on the demonstrations in sft.path, saved to sft.output_dir"


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    with staged_output(load(args), "sft") as cfg:
        sft(cfg)


def sft(cfg) -> list[dict]:
    from cluster.models import resolve_model
    from cluster.pipeline import held_out_gold, ranks_ready, stage_run
    from learner.sft import run_sft

    model_path = resolve_model(cfg.model.path)
    with stage_run(cfg, "sft") as (logger, summary):
        path, history = run_sft(model_path, ranks_ready(cfg, "sft"), logger)
        for h in history:
            trained = f"train loss {h['train/loss']:.3f}, " if "train/loss" in h else ""
            print(f"epoch {h['epoch']}: {trained}held-out loss {h['eval/loss']:.3f} (perplexity "
                  f"{h['eval/perplexity']:.2f})")
        before, after = held_out_gold(cfg, model_path, "base"), held_out_gold(cfg, path, "sft", kl_to=model_path)
        summary.update({**history[-1], "gold_reward_before": before["eval/gold_reward_mean"],
                        **{k.replace("eval/", "after/"): v for k, v in after.items()}})
    print(f"held-out gold reward ({cfg.train.gold_scorer}): {before['eval/gold_reward_mean']:+.3f} before, "
          f"{after['eval/gold_reward_mean']:+.3f} after SFT, KL to the starting policy "
          f"{after['eval/kl_mean']:.2f}")
    print(f"\nfine-tuned policy saved to {path} (train from it with model.path={path})")
    return history
