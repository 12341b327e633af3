"""The learner and the reference model in-process on the tiny model: the reference computes exactly as the
learner does (KL 0 at the start), rollouts from another policy are weighted by the truncated importance
ratio (decoupled PPO), and the score shaping options (missing-EOS penalty, running normalisation)."""

import math
import random

import pytest
import torch

from actors.reference import ReferenceModel
from cluster.models import prepare_tiny
from core.config import PPOConfig, ReferenceConfig
from learner.learner import LearnerSetup, PPOLearner
from tests.helpers import assert_same_changes, grouped, make_learner, rollouts, snapshot, with_sgd


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(prepare_tiny())


def test_the_reference_computes_as_the_learner_does_so_the_kl_starts_at_zero(tiny):
    learner = make_learner(tiny)
    reference = ReferenceModel(tiny, ReferenceConfig(threads=1), dtype="float32", autocast="none", micro_batch=3)
    batch = rollouts(learner)
    refs = reference.ref_logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    gap = max(abs(a - b) for r, ref in zip(batch, refs) for a, b in zip(r.logprobs, ref))
    assert gap < 1e-5  # other micro-batches, so other padding, but the same arithmetic
    for r, ref in zip(batch, refs):
        r.ref_logprobs = ref
    metrics = learner.update(batch)
    assert abs(metrics["kl/mean"]) < 1e-4
    assert metrics["offpolicy/logprob_gap"] < 1e-5 and metrics["offpolicy/is_truncated_frac"] == 0.0
    # scored at another temperature, the same tokens are less (or more) likely
    hotter = reference.ref_logprobs([batch[0].prompt_ids], [batch[0].response_ids], temperature=2.0)[0]
    assert max(abs(a - b) for a, b in zip(hotter, refs[0])) > 1e-3


def test_a_learner_holding_the_reference_trains_as_with_the_reference_actor(tiny):
    # reference.placement=learner: the rollouts come without reference log-probs and the learner's frozen
    # copy supplies them in the update's first pass, the same numbers as the reference actor's
    with_actor, holding = make_learner(tiny), PPOLearner(
        tiny, PPOConfig(autocast="none", threads=1, minibatch_size=8, advantage="gae"), LearnerSetup(inference_dtype="float32", reference=True))
    reference = ReferenceModel(tiny, ReferenceConfig(threads=1), dtype="float32", autocast="none")
    batch = rollouts(with_actor)
    refs = reference.ref_logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    for _ in range(2):  # the second update has a policy away from the reference: a KL to shape the rewards
        for r, ref in zip(batch, refs):
            r.ref_logprobs = ref
        ours = with_actor.update(batch)
        for r in batch:
            r.ref_logprobs = None
        theirs = holding.update(batch)
    assert ours["kl/mean"] > 1e-4 and theirs["kl/mean"] == pytest.approx(ours["kl/mean"], rel=1e-4, abs=1e-6)
    for a, b in zip(with_actor.policy.parameters(), holding.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # it answers for the reference (the evaluation's KL): the initial policy's log-probs, not its own
    held = holding.ref_logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    assert max(abs(a - b) for x, y in zip(held, refs) for a, b in zip(x, y)) < 1e-5
    assert make_learner(tiny).reference.kind == "rollouts" and holding.reference.kind == "frozen"
    # without a KL penalty nothing needs the reference's log-probs: no forward of it, no KL reported
    unpenalised = PPOLearner(tiny, PPOConfig(autocast="none", threads=1, minibatch_size=8, kl_coef=0.0, advantage="gae"),
                             LearnerSetup(inference_dtype="float32", reference=True))
    unpenalised.reference.module = None  # calling it would fail the update
    assert "kl/mean" not in unpenalised.update(batch)


def test_rollouts_from_an_older_policy_are_weighted_and_truncated(tiny):
    """The behaviour policy gave every sampled token a quarter of the learner's probability: w = 4 on every
    token, truncated at is_cap = 2. With one minibatch and one epoch, the loss and the KL estimate are
    measured at the learner's starting weights, so the decoupled ones are exactly twice the uncorrected ones."""
    metrics = {}
    for decoupled in (True, False):
        learner = make_learner(tiny, decoupled=decoupled, is_cap=2.0)
        batch = rollouts(learner)
        for r in batch:
            r.logprobs = [lp - math.log(4.0) for lp in r.logprobs]
            r.ref_logprobs = [lp - 0.5 for lp in r.ref_logprobs]  # KL 0.5 nats per token to the reference
        metrics[decoupled] = learner.update(batch)
    on, off = metrics[True], metrics[False]
    assert on["offpolicy/is_weight_mean"] == pytest.approx(4.0, rel=1e-4)
    assert on["offpolicy/is_truncated_frac"] == 1.0 and off["offpolicy/is_truncated_frac"] == 1.0
    assert on["offpolicy/logprob_gap"] == pytest.approx(math.log(4.0), rel=1e-4)
    assert on["loss/policy"] == pytest.approx(2 * off["loss/policy"], rel=1e-4)
    assert on["kl/mean"] == pytest.approx(2 * off["kl/mean"], rel=1e-4)
    tokens = off["learner/tokens"] / 8
    assert off["kl/mean"] == pytest.approx(0.5 * tokens, rel=1e-4)


def test_missing_eos_penalty_and_running_reward_normalisation(tiny):
    learner = make_learner(tiny, missing_eos_penalty=1.0)
    batch = rollouts(learner)  # scores 0, 1, 2, 3, 0, 1, 2, 3: mean 1.5
    for r in batch[:4]:
        r.finished = False  # cut off at the length limit
    metrics = learner.update(batch)
    assert metrics["rollout/score_mean"] == pytest.approx(1.5) and metrics["rollout/finished_frac"] == 0.5
    assert metrics["reward/optimised_mean"] == pytest.approx(1.0)  # four responses lose 1 each

    learner = make_learner(tiny, reward_norm=True)
    metrics = learner.update(rollouts(learner))
    # the first batch's own moments: mean 1.5, std sqrt(1.25)
    assert metrics["reward/running_mean"] == pytest.approx(1.5)
    assert metrics["reward/running_std"] == pytest.approx(math.sqrt(1.25))
    assert metrics["reward/optimised_mean"] == pytest.approx(0.0, abs=1e-6)
    assert learner.score_moments.count == 8


def test_a_checkpoint_of_another_model_is_refused_by_name(tiny, tmp_path):
    import json
    import shutil

    smaller = tmp_path / "one-layer"
    shutil.copytree(tiny, smaller)
    config = json.loads((smaller / "config.json").read_text())
    (smaller / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    make_learner(str(smaller)).save_checkpoint(str(tmp_path / "ckpt"))
    learner = make_learner(tiny)
    with pytest.raises(ValueError, match=r"of another model: missing \['policy\.model\.layers\.1\."):
        learner.load_checkpoint(str(tmp_path / "ckpt"))
    assert learner.version == 0


def test_the_weight_source_for_vllms_nccl_engine_declares_what_it_sends_and_sends_the_publication(tiny):
    """vLLM's NCCL engine sizes the workers' receive buffers from metadata() and fills them from iteration:
    the two must agree, and carry what the object-store path publishes."""
    learner = make_learner(tiny)
    learner.update(rollouts(learner))
    source = learner.weight_source()
    sent = list(source)
    assert [(m.name, m.dtype, tuple(m.shape)) for m in source.metadata()] == \
        [(name, t.dtype, tuple(t.shape)) for name, t in sent]
    published = learner.weights()  # the state dict the object-store path publishes, as one
    assert {name for name, _ in sent} == set(published)
    assert all(torch.equal(t, published[name]) for name, t in sent)
    assert "lm_head.weight" in dict(sent)  # tied, under its own name too, as the workers load it
    assert [name for name, _ in source] == [name for name, _ in sent]  # a fresh pass every round


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_train_without_a_value_head_toward_the_better_response(tiny, estimator):
    learner = make_learner(tiny, advantage=estimator, lr=1e-3, loss_agg="seq_mean_token_mean")
    assert learner.value_head is None
    assert not any("value_head" in name for name, _ in learner.model.named_parameters())
    batch = grouped(learner)
    before = learner.logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    metrics = learner.update(batch)
    assert "loss/value" not in metrics and "value/mean" not in metrics
    after = learner.logprobs([r.prompt_ids for r in batch], [r.response_ids for r in batch])
    change = [sum(a) - sum(b) for a, b in zip(after, before)]
    assert all(c > 0 for c in change[0::2]) and all(c < 0 for c in change[1::2])  # better up, worse down


def test_the_workers_log_probs_stand_for_the_learners_pass_on_policy(tiny):
    # ppo.old_logprobs=behaviour: no forward pass before the update; on-policy the workers' log-probs are
    # the learner's own, so the update is the same, and the old log-probs really are the rollouts'
    own, theirs = (make_learner(tiny, advantage="grpo", old_logprobs=o) for o in ("learner", "behaviour"))
    batch = grouped(own)
    assert own.update(batch)["policy/clip_frac"] == theirs.update(batch)["policy/clip_frac"] == 0.0
    for a, b in zip(own.policy.parameters(), theirs.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    shifted, again = make_learner(tiny, advantage="grpo", old_logprobs="behaviour"), grouped(own)
    for r in again:
        r.logprobs = [lp - 0.5 for lp in r.logprobs]  # a policy that found every token less likely
    metrics = shifted.update(again)
    # ratio exp(0.5), far outside the clip range: every token with a positive advantage (half) is clipped
    assert metrics["policy/clip_frac"] > 0.4
    assert metrics["offpolicy/logprob_gap"] == 0.0


def test_ppo_ptx_mixes_the_demonstrations_log_likelihood_into_each_step(tiny):
    from learner.sft import held_out_nll

    plain = make_learner(tiny, lr=1e-3)
    batch = rollouts(plain)
    ptx = [([5, 6, 7], [9, 10, 11, 2]), ([12, 13], [14, 15, 2])]
    mixed = make_learner(tiny, lr=1e-3, ptx_coef=2.0, ptx_path="demos.jsonl", ptx_batch_size=2)
    mixed.ptx = ptx
    before = held_out_nll(mixed.policy, ptx, mixed.pad_id, "none")["eval/loss"]
    metrics = mixed.update(batch)  # one minibatch of 8: one step
    # the mix, by hand: the PPO terms plus ptx_coef times the demonstrations' NLL before the step
    assert metrics["loss/ptx"] == pytest.approx(before, abs=1e-5)
    assert metrics["loss/total"] == pytest.approx(metrics["loss/policy"] + 0.1 * metrics["loss/value"]
                                                  + 2.0 * metrics["loss/ptx"], abs=1e-5)
    assert "loss/ptx" not in plain.update(batch)
    for _ in range(3):
        plain.update(batch), mixed.update(batch)
    after = {name: held_out_nll(m.policy, ptx, m.pad_id, "none")["eval/loss"] for name, m in [("plain", plain),
                                                                                               ("mixed", mixed)]}
    assert after["mixed"] < before - 0.05 and after["mixed"] < after["plain"] - 0.05
    assert mixed.perplexity(ptx)["eval/loss"] == pytest.approx(after["mixed"], abs=1e-5)


def test_the_samples_of_one_prompt_share_its_forward_and_train_as_if_each_ran_alone(tiny, monkeypatch):
    from core import forward

    batch = grouped(make_learner(tiny), seed=3)
    random.Random(0).shuffle(batch)  # the stream delivers groups in any order
    shared_counts = []

    def spy(prompt_ids, prompt_mask):
        firsts, rows = real(prompt_ids, prompt_mask)
        shared_counts.append((len(prompt_ids), None if firsts is None else len(firsts)))
        return firsts, rows

    real = forward.shared_prompts
    alone = with_sgd(make_learner(tiny, advantage="grpo", minibatch_size=4, lr=1e-2))
    start = snapshot(alone)
    monkeypatch.setattr(forward, "shared_prompts", lambda ids, mask: (None, None))
    expected = alone.update(batch)
    sharing = with_sgd(make_learner(tiny, advantage="grpo", minibatch_size=4, lr=1e-2))
    monkeypatch.setattr(forward, "shared_prompts", spy)
    metrics = sharing.update(batch)
    # every minibatch of 4 held two whole groups (two prompts, each run once for its two samples)
    assert shared_counts and all(counts == (4, 2) for counts in shared_counts)
    assert metrics["loss/policy"] == pytest.approx(expected["loss/policy"], abs=1e-6)
    assert_same_changes(start, sharing.weights(), alone.weights())


def test_a_shared_prompt_is_one_decoder_call_with_the_plain_forwards_log_probs_and_gradients(tiny, monkeypatch):
    """Groups of 3, 1 and 2 rows of different lengths: the packed forward runs the decoder once (in a learner
    group every call is a collective), and gives each row the log-probs and the gradient of a row of its own;
    eager attention (an additive mask) as sdpa (a boolean one)."""
    from transformers import AutoModelForCausalLM

    from core import forward
    from core.rollout import pad

    model = AutoModelForCausalLM.from_pretrained(tiny)
    rng = random.Random(1)
    distinct = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 8))] for _ in range(3)]
    prompts = [distinct[0]] * 3 + [distinct[1]] + [distinct[2]] * 2
    responses = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 6))] for _ in prompts]
    input_ids, attention_mask, labels, mask = pad(prompts, responses, 0)
    calls = []
    decoder = model.get_decoder()
    decoder.register_forward_hook(lambda module, args, output: calls.append(1))

    def grads():
        model.zero_grad()
        logits, _ = forward.response_forward(model, input_ids, attention_mask, labels.shape[1])
        logprobs = forward.logprobs_from_logits(logits, labels) * mask
        logprobs.sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed, packed_grads = grads()
    assert len(calls) == 1
    with monkeypatch.context() as m:
        m.setattr(forward, "shared_prompts", lambda ids, mask: (None, None))
        plain, plain_grads = grads()
    model.config._attn_implementation = "eager"
    eager, eager_grads = grads()
    for ours, our_grads in ((packed, packed_grads), (eager, eager_grads)):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
        for name, g in plain_grads.items():
            assert (our_grads[name] - g).norm() <= 1e-4 * g.norm(), name


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_gives_tied_scores_no_advantage_of_their_own_whatever_the_kl(tiny, kl_in):
    """Four samples of one prompt that all score 1, at KL 0, 0.1, 0.2, 0.3 nats a token from the reference: the
    group-normalised scores are 0, so with the KL in the reward only its beta-sized return moves them (before,
    normalising score - beta * KL made unit-size advantages of the KL alone), and with the KL in the loss
    nothing but the loss's KL term does."""
    learner = make_learner(tiny, advantage="grpo", kl_coef=0.05, kl_in=kl_in)
    batch = grouped(learner, seed=6, count=4, size=4)
    for i, r in enumerate(batch):
        r.score = 1.0
        r.ref_logprobs = [lp - 0.1 * i for lp in r.logprobs]
    metrics = learner.update(batch)
    if kl_in == "reward":
        assert 0 < metrics["advantage/abs_mean"] < 0.05 * 0.3 * 6  # beta x the largest KL still to come
        assert "loss/kl" not in metrics
    else:
        assert metrics["advantage/abs_mean"] == 0.0
        # k3 of a log-ratio d is e^-d - 1 + d (d = 0.1 i on every token of row i), averaged over the tokens
        k3 = [(math.exp(-0.1 * i) - 1 + 0.1 * i) * len(r.response_ids) for i, r in enumerate(batch)]
        assert metrics["loss/kl"] == pytest.approx(sum(k3) / sum(len(r.response_ids) for r in batch), rel=1e-4)
        assert metrics["loss/total"] == pytest.approx(metrics["loss/policy"] + 0.05 * metrics["loss/kl"], abs=1e-6)


def test_a_checkpoint_keeps_ptx_place_and_the_reward_statistics_unless_the_reward_changed(tiny, tmp_path):
    options = dict(reward_norm=True, kl_target=1.0, ptx_coef=1.0, ptx_path="demos.jsonl", ptx_batch_size=3)
    ptx = [([5, 6, 7], [9, 10, 2]), ([12, 13], [14, 2])]
    learner = PPOLearner(tiny, PPOConfig(autocast="none", threads=1, minibatch_size=8, advantage="gae", **options),
                         LearnerSetup(inference_dtype="float32"), ptx=ptx)
    learner.update(rollouts(learner))
    assert learner.ptx_next == 1 and learner.score_moments.count == 8 and learner.kl_ctl.value != 0.05
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    for same_reward in (True, False):
        resumed = PPOLearner(tiny, PPOConfig(autocast="none", threads=1, minibatch_size=8, advantage="gae", **options),
                             LearnerSetup(inference_dtype="float32"), ptx=ptx)
        resumed.load_checkpoint(str(tmp_path / "ckpt"), reward_state=same_reward)
        assert resumed.ptx_next == 1  # the demonstrations' cycle goes on where it was
        assert resumed.score_moments.count == (8 if same_reward else 0)
        assert resumed.kl_ctl.value == (learner.kl_ctl.value if same_reward else 0.05)


def _tiny_of(kind: str, path, **transform):
    """A randomly initialised 2-layer model of another architecture, saved to `path`."""
    import transformers

    config_class, model_class = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                                 "cohere": ("CohereConfig", "CohereForCausalLM"),
                                 "granite": ("GraniteConfig", "GraniteForCausalLM")}[kind]
    config = getattr(transformers, config_class)(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16, pad_token_id=0, **transform)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)  # logits large enough for every transform to matter
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind,transform", [("gemma2", {"final_logit_softcapping": 3.0}),
                                            ("cohere", {"logit_scale": 0.25}), ("granite", {"logits_scaling": 8.0})])
def test_log_probs_apply_the_models_own_logit_transform_and_an_unknown_one_is_refused(tmp_path, monkeypatch, kind,
                                                                                     transform):
    from core import forward

    path = _tiny_of(kind, tmp_path / kind, **transform)
    model = forward.load_causal_lm(path, "float32", "cpu")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    theirs = torch.log_softmax(model(input_ids=ids).logits[:, -4:-1].float(), -1)
    ours, _ = forward.response_forward(model, ids, torch.ones_like(ids), 3)
    torch.testing.assert_close(torch.log_softmax(ours, -1), theirs, rtol=0, atol=1e-4)
    monkeypatch.setattr(forward, "after_head", lambda config, logits: logits)  # as if the transform were unknown
    with pytest.raises(ValueError, match=r"ForCausalLM \(.*\) computes its logits in a way this project's forward "
                                         r"does not reproduce"):
        forward.load_causal_lm(path, "float32", "cpu")
