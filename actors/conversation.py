"""The tokens of a conversation, built turn by turn as the policy saw them: its replies exactly as sampled,
and between them each message of the environment, rendered by the chat template once and tokenised once.
Nothing said earlier is tokenised again, so the learner trains on the very token ids the policy sampled."""

from __future__ import annotations

# Stand-ins for an earlier turn when rendering the template around a new message; only their positions in
# the rendered text matter.
_EARLIER_USER, _EARLIER_REPLY = "\x1fearlier request\x1f", "\x1fearlier reply\x1f"


def next_turn_text(tokenizer, message: str, sampled_end: str | None) -> str:
    """The text between a reply of the policy and its next one: the rest of the reply's turn as the chat
    template closes it (less `sampled_end`, the end-of-turn token the policy sampled itself, if it did), the
    environment's `message` as a user turn, and the opening of the policy's next turn."""
    earlier = [{"role": "user", "content": _EARLIER_USER}, {"role": "assistant", "content": _EARLIER_REPLY}]
    base = tokenizer.apply_chat_template(earlier, tokenize=False)
    full = tokenizer.apply_chat_template(earlier + [{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    if not full.startswith(base) or _EARLIER_REPLY not in base:
        raise ValueError("this chat template renders a conversation's earlier turns differently once another turn "
                         "follows, so turns cannot be appended to the tokens already sampled; multi-turn "
                         "environments need a template that only appends (ChatML, Llama 3, ...)")
    closing = base[base.index(_EARLIER_REPLY) + len(_EARLIER_REPLY):]
    if sampled_end and closing.startswith(sampled_end):
        closing = closing[len(sampled_end):]
    return closing + full[len(base):]


def next_turn_ids(tokenizer, message: str, sampled_end: str | None) -> list[int]:
    """`next_turn_text` as token ids (the template's special tokens as themselves, nothing added)."""
    return list(tokenizer(next_turn_text(tokenizer, message, sampled_end), add_special_tokens=False)["input_ids"])
