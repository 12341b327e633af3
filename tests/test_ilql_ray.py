"""`rlhf ilql` end to end with the tiny model and real vLLM: a job keeps its rollouts, ILQL trains on them
offline, and the result (linear heads folded into the LM head) is an ordinary model that vLLM samples for the
held-out evaluation and transformers loads; MLP heads are decoded in the learner."""

import json

import pytest

from cluster.cli import main
from tests.helpers import TINY, run

pytestmark = pytest.mark.ray


def test_ilql_learns_offline_from_the_rollouts_a_job_kept(ray_session, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    run(tmp_path / "job", "train.steps=2", "train.keep_rollouts=true")
    rollouts = tmp_path / "job" / "rollouts"
    assert sorted(p.name for p in rollouts.iterdir()) == ["step-000001.jsonl", "step-000002.jsonl"]
    capsys.readouterr()
    out = tmp_path / "ilql"
    assert main(["ilql", "--config", str(TINY), f"ilql.path={rollouts}", f"ilql.output_dir={out}", "ilql.threads=1",
                 "ilql.eval_fraction=0.2", "ilql.autocast=none", "ilql.batch_size=4", "ilql.eval_betas=[0, 1]",
                 "ilql.heads=linear",
                 "generation.num_workers=1"]) == 0
    printed = capsys.readouterr().out
    assert "ilql: 13 scored replies, 3 held out" in printed
    assert "after ILQL at beta 4 (top-k 20, linear heads)" in printed and f"(model.path={out})" in printed
    assert "after ILQL at beta 1 (top-k 20, linear heads)" in printed and f"({out}/beta-1)" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not model.config.tie_word_embeddings and (out / "ilql_heads.pt").is_file()
    # the further betas fold the same heads: the LM heads at 0, 1 and 4 differ by 1 and 4 times the mean Q
    qs = torch.load(out / "ilql_heads.pt")["state"]
    mean_q = (qs["qs.0.weight"] + qs["qs.1.weight"]) / 2
    heads = {b: AutoModelForCausalLM.from_pretrained(p).get_output_embeddings().weight.detach()
             for b, p in [(0, out / "beta-0"), (1, out / "beta-1"), (4, out)]}
    assert mean_q.abs().max() > 0
    torch.testing.assert_close(heads[1] - heads[0], mean_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(heads[4] - heads[0], 4 * mean_q, atol=1e-5, rtol=1e-4)


def test_mlp_heads_trained_on_two_ranks_are_decoded_in_the_learner(ray_session, tmp_path, capsys):
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"My bus was late, {i}.", "response": "What a lovely walk it gave me"
                                        if i % 2 else "Awful.", "reward": 0.8 if i % 2 else -0.5}) + "\n"
                            for i in range(12)))
    out = tmp_path / "ilql"
    assert main(["ilql", "--config", str(TINY), f"ilql.path={data}", f"ilql.output_dir={out}", "ilql.heads=mlp",
                 "ilql.threads=1", "ilql.eval_fraction=0.2", "ilql.autocast=none", "ilql.batch_size=4",
                 "ilql.num_learners=2", "train.wandb_mode=offline"]) == 0
    printed = capsys.readouterr().out
    assert "after ILQL at beta 4 (top-k 20, mlp heads)" in printed and "decoded in the learner" in printed
    assert (out / "ilql_heads.pt").is_file()
    # the held-out losses of each epoch, and the evaluation, in metrics.jsonl and an offline W&B run
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if "eval/loss_q" in r] == [0, 1]
    assert "beta-4/gold_reward_mean" in logged[-1] and list((out / "wandb").glob("offline-run-*"))
