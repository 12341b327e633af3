"""`rlhf make-preferences`: a preference set from the policy's own samples. Two replies to each training
prompt, labelled by `preferences.labeller` (the stand-in for people, with `preferences.flip_fraction` of the
labels flipped like annotators who disagree), written to `<preferences.output_dir>/pairs.jsonl`, which
`preferences.path` takes."""

from __future__ import annotations

from cluster.commands import config_arguments, deprecated_out, write_file_output

HELP = "two samples per prompt from the policy, labelled by preferences.labeller"


def add_arguments(parser) -> None:
    config_arguments(parser)
    deprecated_out(parser)


def run(args) -> None:
    write_file_output(args, "preferences", "pairs.jsonl", make_preferences)


def make_preferences(cfg, out_path: str) -> str:
    """`preferences.num_pairs` labelled pairs of the policy's samples, written to `out_path`."""
    from cluster.pipeline import generation_workers, gold_pairs, keep_scored, policy_prompts
    from core.preferences import write_preferences
    from reward_server.scorers import make_scorer

    pc = cfg.preferences
    model_path, train, _ = policy_prompts(cfg)
    labeller = make_scorer(pc.labeller)
    kept = [] if pc.keep_rollouts else None
    with generation_workers(cfg, model_path) as pool:
        pairs, extra = gold_pairs(pool, train, pc.num_pairs, labeller, pc.flip_fraction, pc.min_margin, pc.seed,
                                  kept=kept)
    write_preferences(out_path, pairs, extra)
    if kept is not None:
        keep_scored(pc.output_dir, model_path, kept, "preferences.keep_rollouts")
    print(f"wrote {len(pairs)} preference pairs to {out_path} (labelled by {pc.labeller}, "
          f"{sum(e['flipped'] for e in extra)} labels flipped)")
    return out_path
