"""`rlhf dpo`: DPO (Rafailov et al. 2023) of `model.path` on the preference pairs `train-rm` reads
(`preferences.path`), with the reference log-probs computed first by the reference model; the base and the
result judged by the gold scorer on the held-out prompts, the policy saved to `dpo.output_dir`."""

from __future__ import annotations

import logging
from functools import partial

from cluster.commands import config_arguments, load, staged_output

HELP = "DPO on the pairs in preferences.path, saved to dpo.output_dir, judged on held-out prompts"

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    config_arguments(parser)


def run(args) -> None:
    with staged_output(load(args), "dpo") as cfg:
        dpo(cfg)


def dpo(cfg) -> dict:
    from transformers import AutoTokenizer

    from actors.reference import ReferenceModel
    from cluster.models import resolve_model
    from cluster.pipeline import held_out_gold, load_pair_sets, stage_run, train_policy
    from core.config import ReferenceConfig
    from learner.dpo import DPOTrainer, encode_pairs, with_reference

    dc, pc = cfg.dpo, cfg.preferences
    train_pairs, eval_pairs = load_pair_sets(pc)
    model_path = resolve_model(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = [encode_pairs(pairs, tokenizer, dc.max_length, source, pc.on_bad_row)
               for pairs, source in [(train_pairs, pc.path), (eval_pairs, pc.eval_path or pc.path)]]
    reference = ReferenceModel(model_path, ReferenceConfig(device=dc.device, threads=dc.threads), dtype=dc.dtype,
                               autocast=dc.autocast)
    train, held = (with_reference(pairs, reference) for pairs in encoded)
    del reference
    log.info("dpo: %d pairs, %d held out, beta %g -> %s", len(train), len(held), dc.beta, dc.output_dir)
    with stage_run(cfg, "dpo") as (logger, summary):
        trainer, history = train_policy(cfg, "dpo", partial(DPOTrainer, model_path, dc), train, held, logger)
        path = trainer.save(dc.output_dir)
        del trainer
        for h in history:
            print(f"epoch {h['epoch']}: held-out loss {h['eval/loss']:.3f}, implicit-reward accuracy "
                  f"{h['eval/accuracy']:.3f}, margin {h['eval/margin']:+.3f}")
        before, after = held_out_gold(cfg, model_path, "base"), held_out_gold(cfg, path, "dpo", kl_to=model_path)
        summary.update({**history[-1], "gold_reward_before": before["eval/gold_reward_mean"],
                        "gold_reward_after": after["eval/gold_reward_mean"], "kl_after": after["eval/kl_mean"]})
    print(f"held-out gold reward ({cfg.train.gold_scorer}): {before['eval/gold_reward_mean']:+.3f} before, "
          f"{after['eval/gold_reward_mean']:+.3f} after DPO, KL to the starting policy "
          f"{after['eval/kl_mean']:.2f}\nDPO policy saved to {path} (use it with model.path={path})")
    return summary
