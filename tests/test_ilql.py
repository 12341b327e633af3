"""ILQL (learner/ilql.py): the expectile loss, the TD target, the CQL term, the Polyak update and the whole loss
with hand values; the folded LM head against the heads it folds; the learner's decoding against transformers'
greedy search; and a tiny offline run whose decoded replies beat the data they learnt from."""

import math

import pytest
import torch
from torch import nn

from learner.ilql import (
    ILQLHeads,
    cql_loss,
    decode,
    expectile_loss,
    folded,
    ilql_losses,
    polyak,
    td_targets,
)


class Losses:  # the ILQL settings ilql_losses reads
    def __init__(self, **kw):
        self.tau, self.gamma, self.cql_scale, self.awac_scale, self.lm_term = 0.7, 0.9, 0.1, 1.0, "plain"
        self.__dict__.update(kw)


@pytest.mark.pure
def test_expectile_loss_weighs_underestimates_by_tau():
    assert expectile_loss(torch.tensor([2.0, -2.0, 0.0]), 0.7).tolist() == pytest.approx([2.8, 1.2, 0.0])


@pytest.mark.pure
def test_td_target_bootstraps_from_the_next_state_and_ends_with_the_reward():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    y = td_targets(values, torch.tensor([10.0, 20.0]), torch.tensor([4, 2]), gamma=0.5)
    # a middle token: gamma V(s_{t+1}); the last: the reward alone (terminal); past the end: 0
    assert y.tolist() == [[1.0, 1.5, 2.0, 10.0], [3.0, 20.0, 0.0, 0.0]]
    assert not y.requires_grad  # the target does not move V


@pytest.mark.pure
def test_cql_term_is_the_cross_entropy_of_the_q_values_against_the_action():
    q = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    # log(1 + 3) - log 3 at the first token; the second is masked out
    assert cql_loss(q, torch.tensor([[1, 0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(math.log(4 / 3))


@pytest.mark.pure
def test_polyak_moves_the_target_by_alpha_of_the_way():
    target, source = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.zeros_(target.weight)
    nn.init.ones_(source.weight)
    polyak(target, source, 0.25)
    assert target.weight.item() == pytest.approx(0.25)
    polyak(target, source, 0.25)
    assert target.weight.item() == pytest.approx(0.4375)
    polyak(target, source, 1.0)
    assert target.weight.item() == 1.0


def one_q_heads():
    """Hidden size 1, vocabulary 2: Q(h) = (h, 2h) (the target a copy), V(h) = h / 2."""
    heads = ILQLHeads(1, 2, "linear", two_qs=False)
    with torch.no_grad():
        heads.qs[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        heads.v.weight.fill_(0.5)
        heads.v.bias.zero_()
    heads.sync_targets(1.0)
    return heads


@pytest.mark.pure
def test_the_ilql_loss_by_hand():
    heads = one_q_heads()
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])  # the third token is padding
    actions, mask = torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 1.0, 0.0]])
    lm = torch.tensor([[-1.0, -2.0, -50.0]])
    loss, stats = ilql_losses(heads, hidden, lm, actions, mask, torch.tensor([1.0]), Losses())
    # Q(s0, 1) = 2, Q(s1, 0) = 3; V = (0.5, 1.5); y = (0.9 * 1.5, r = 1)
    loss_q = ((2 - 1.35) ** 2 + (3 - 1) ** 2) / 2
    loss_v = 0.7 * 1.5 ** 2  # target Q - V = 1.5 at both tokens: underestimates, weighed by tau
    cql = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(3))) / 2  # CE of (1, 2) at 1 and of (3, 6) at 0
    assert stats["loss_q"].item() == pytest.approx(loss_q)
    assert stats["loss_v"].item() == pytest.approx(loss_v)
    assert stats["loss_cql"].item() == pytest.approx(cql)
    assert stats["loss_lm"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(loss_q + loss_v + 0.1 * cql + 1.5)
    _, weighted = ilql_losses(heads, hidden, lm, actions, mask, torch.tensor([1.0]), Losses(lm_term="advantage"))
    assert weighted["loss_lm"].item() == pytest.approx(1.5 * math.exp(1.5))  # exp(target Q - V) per token


@pytest.mark.pure
def test_the_value_loss_moves_v_only_and_the_q_loss_q_only():
    heads = one_q_heads()
    hidden = torch.tensor([[[1.0], [3.0]]])
    args = (torch.zeros(1, 2), torch.tensor([[1, 0]]), torch.ones(1, 2), torch.tensor([1.0]))
    loss, _ = ilql_losses(heads, hidden, *args, Losses(cql_scale=0.0, awac_scale=0.0))
    loss.backward()
    # dL_v/dV = -2 tau (targetQ - V) / 2 per token = -0.7 * 1.5 at h = 1 and 3: d/dw = -1.05 * (1 + 3)
    # dL_q/dQ carries y's V, but y is a target: V's gradient is the value loss's alone
    assert heads.v.weight.grad.item() == pytest.approx(-1.05 * 4)
    assert all(p.grad is None for p in heads.target_qs.parameters())
    q_grad = heads.qs[0].weight.grad.flatten().tolist()  # (Q - y) at each token's action: row 1 at h=1, row 0 at h=3
    assert q_grad == pytest.approx([2 * (3 - 1) * 3 / 2, 2 * (2 - 1.35) * 1 / 2])


@pytest.mark.pure
def test_folded_lm_head_gives_the_perturbed_logits_for_any_hidden_state():
    torch.manual_seed(0)
    heads = ILQLHeads(8, 5, "linear", two_qs=True)
    for p in heads.parameters():
        nn.init.normal_(p)
    lm_head = torch.randn(5, 8)
    hidden = torch.randn(3, 8)
    folded_logits = hidden @ heads.folded_lm_head(lm_head, 4.0).T
    q = (heads.qs[0](hidden) + heads.qs[1](hidden)) / 2
    assert torch.allclose(folded_logits, hidden @ lm_head.T + 4.0 * q, atol=1e-4)
    # V shifts every logit of a state alike: the folded policy is the perturbed one, V included
    perturbed = hidden @ lm_head.T + 4.0 * (q - heads.v(hidden))
    assert torch.allclose(torch.softmax(folded_logits, -1), torch.softmax(perturbed, -1), atol=1e-5)
    with pytest.raises(ValueError, match="only linear"):
        ILQLHeads(8, 5, "mlp").folded_lm_head(lm_head, 4.0)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.models import prepare_tiny

    path = str(prepare_tiny())
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_the_folded_model_saved_and_loaded_samples_as_the_heads_say(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    path, model, _ = tiny
    torch.manual_seed(1)
    heads = ILQLHeads(model.config.hidden_size, model.config.vocab_size, "linear")
    for q in heads.qs:
        nn.init.normal_(q.weight, std=0.05)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        base_logits = model(ids).logits
        expected = base_logits + 2.0 * heads.perturbation(hidden)
        folded(model, heads, 2.0).save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert not loaded.config.tie_word_embeddings
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)
        # the trained model is untouched (its head still tied to its embeddings), and the embeddings are its own
        assert torch.equal(model(ids).logits, base_logits)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_decoding_with_beta_zero_is_the_base_models_greedy_search(tiny):
    _, model, tok = tiny
    heads = ILQLHeads(model.config.hidden_size, model.config.vocab_size, "mlp")
    prompts = [[1, 17, 42, 7, 300], [1, 99]]  # of different lengths: left padding and positions
    ours = decode(model, heads, prompts, beta=0.0, top_k=0, temperature=1e-6, max_new_tokens=6, eos_ids=set(),
                  pad_id=0)
    for prompt, reply in zip(prompts, ours):
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
        assert reply == greedy[0, len(prompt):].tolist()


def test_decoding_follows_the_perturbation_and_stops_at_the_end_token(tiny):
    _, model, _ = tiny
    heads = ILQLHeads(model.config.hidden_size, model.config.vocab_size, "mlp")
    with torch.no_grad():
        heads.target_qs[0][-1].bias[42] = 100.0
        heads.target_qs[1][-1].bias[42] = 100.0
    replies = decode(model, heads, [[1, 2, 3]] * 3, beta=1.0, top_k=5, temperature=1.0, max_new_tokens=4,
                     eos_ids=set(), pad_id=0)
    assert replies == [[42] * 4] * 3
    assert decode(model, heads, [[1, 2, 3]], beta=1.0, top_k=5, temperature=1.0, max_new_tokens=4, eos_ids={42},
                  pad_id=0) == [[42]]


def test_a_tiny_offline_run_decodes_replies_above_the_datas_mean(tiny):
    """Replies of six tokens from {A, B, X}, uniformly: the reward is the number of X's (2 on average). ILQL's
    policy, decoded with its perturbation, says X more often than the data and than the same model without it."""
    import random

    from core.config import ILQLConfig
    from learner.ilql import ILQLTrainer

    path, _, tok = tiny
    a, b, x = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" apple", " bread", " sunshine"))
    rng = random.Random(0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Say six words, {i}."}],
                                       add_generation_prompt=True, tokenize=True) for i in range(8)]
    prompts = [p["input_ids"] if hasattr(p, "keys") else list(p) for p in prompts]
    data = []
    for i in range(192):
        reply = [rng.choice((a, b, x)) for _ in range(6)]
        data.append((prompts[i % 8], reply, float(reply.count(x))))
    cfg = ILQLConfig(lr=1e-3, head_lr=1e-2, epochs=4, batch_size=16, autocast="none", threads=1, beta=4.0,
                     heads="linear", target_sync_every=4)
    trainer = ILQLTrainer(path, cfg)
    history = trainer.train(data[:176], data[176:])
    # the LM term learns the data's words; the CQL term pushes down the Q of words the data never says
    assert history[-1]["eval/loss_lm"] < history[0]["eval/loss_lm"] - 5
    assert history[-1]["eval/loss_cql"] < history[0]["eval/loss_cql"] / 4

    def x_per_reply(beta):
        torch.manual_seed(0)
        replies = decode(trainer.model.eval(), trainer.heads, prompts * 4, beta=beta, top_k=10, temperature=1.0,
                         max_new_tokens=6, eos_ids=set(), pad_id=0)
        return sum(r.count(x) for r in replies) / len(replies)

    data_mean = sum(r for *_, r in data) / len(data)
    cloned, ilql = x_per_reply(0.0), x_per_reply(4.0)
    assert abs(data_mean - 2.0) < 0.3 and cloned < data_mean + 0.7  # the LM term alone clones the data
    assert ilql > max(data_mean, cloned) + 1.0, (data_mean, cloned, ilql)


def test_with_lora_only_the_adapters_and_heads_train_and_the_saved_model_has_them_merged(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.config import ILQLConfig
    from learner.ilql import ILQLTrainer

    path, base, _ = tiny
    cfg = ILQLConfig(lr=1e-2, head_lr=1e-2, batch_size=4, autocast="none", threads=1, lora_rank=4,
                     lora_targets="q_proj,v_proj", beta=2.0, heads="linear")
    trainer = ILQLTrainer(path, cfg)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    trainer.train([([1, 5, 9], [20, 21, 2], 1.0), ([1, 6], [22, 2], -1.0)] * 4, [])
    trainer.save(str(tmp_path))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    ours = base.state_dict()
    changed = {k for k in ours if "lm_head" not in k and not torch.equal(saved[k], ours[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)  # merged adapters
    heads = ILQLHeads(base.config.hidden_size, base.config.vocab_size)
    heads.load_state_dict(torch.load(tmp_path / "ilql_heads.pt")["state"])
    torch.testing.assert_close(saved["lm_head.weight"], heads.folded_lm_head(ours["model.embed_tokens.weight"], 2.0))


def test_replies_over_the_length_limit_are_named_by_row_or_skipped(tiny):
    from core.rollout_records import RolloutDataError, ScoredReply
    from learner.ilql import encode_scored

    _, _, tok = tiny
    replies = [ScoredReply("Hi.", "Fine.", 0.5, row=0, prompt_ids=[1, 2], response_ids=[3, 4]),
               ScoredReply("Hi.", "Long.", 0.1, row=1, prompt_ids=[1, 2], response_ids=list(range(20))),
               ScoredReply("My bus was late.", "A walk, then!", 0.9, row=2)]  # text only: tokenised here
    with pytest.raises(RolloutDataError, match=r"row 1: 2 prompt \+ 20 reply tokens, over ilql.max_length = 16"):
        encode_scored(replies, tok, 16, "data.jsonl", "error")
    kept = encode_scored(replies, tok, 64, "data.jsonl", "skip")
    assert [r for *_, r in kept] == [0.5, 0.1, 0.9] and kept[0][:2] == ([1, 2], [3, 4])
    assert kept[2][1][-1] == tok.eos_token_id  # a finished text reply ends with the end token
    assert [r for *_, r in encode_scored(replies, tok, 16, "data.jsonl", "skip")] == [0.5]  # row 2 is over 16 too
