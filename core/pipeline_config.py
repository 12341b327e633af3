"""The config sections of the pipeline stages around PPO: preference data, reward-model training, SFT, DPO,
Elo ratings, online RLHF, West-of-N, Best-of-N, the reward-modeling report and ILQL. `RunConfig`
(core/config.py) composes them with the PPO job's."""

from __future__ import annotations

from dataclasses import dataclass

from core.config_fields import AUTOCAST_HELP, DTYPES, LORA_ALPHA_HELP, LORA_TARGETS, LORA_TARGETS_HELP, opt


@dataclass
class PreferenceConfig:
    path: str = opt("", "preference pairs: a local .jsonl/.json/.parquet/.csv file or a Hub dataset name")
    form: str = opt("explicit", "`explicit`: prompt/chosen/rejected columns; `conversation`: chosen and "
                    "rejected are whole dialogues sharing a prefix (Anthropic HH-RLHF); `scored`: several scored "
                    "replies per prompt (prompt/response/reward columns, or a job's rollouts folder), each prompt's "
                    "best reply chosen over its worst where they differ by min_margin",
                    choices=("explicit", "conversation", "scored"))
    prompt_column: str = opt("prompt", "column of the prompt (explicit and scored forms)")
    chosen_column: str = opt("chosen", "column of the preferred response or dialogue")
    rejected_column: str = opt("rejected", "column of the other response or dialogue")
    response_column: str = opt("response", "column of the reply (scored form)")
    reward_column: str = opt("reward", "column of the reply's reward (scored form)")
    on_bad_row: str = opt("error", "a row with a missing column, an empty string or chosen == rejected: "
                          "`error` lists them all and stops, `skip` drops and counts them", choices=("error", "skip"))
    eval_path: str = opt("", "held-out pairs; empty = split `eval_fraction` of `path` off")
    eval_fraction: float = opt(0.1, "share of `path` held out when `eval_path` is empty", gt=0.0, lt=1.0)
    num_pairs: int = opt(256, "pairs `rlhf make-preferences` generates", ge=1)
    labeller: str = opt("vader", "scorer that labels generated pairs (same forms as reward.scorer)")
    flip_fraction: float = opt(0.2, "share of generated labels flipped, like annotators who disagree", ge=0.0, lt=0.5)
    min_margin: float = opt(0.05, "generated (or scored-form) pairs whose scores differ by less are ties, dropped",
                            ge=0.0)
    seed: int = opt(0, "seed of the eval split, the label flips and the generation order")
    output_dir: str = opt("runs/preferences", "where `rlhf make-preferences` writes pairs.jsonl")
    keep_rollouts: bool = opt(False, "`rlhf make-preferences` also writes every labelled reply with its labeller "
                                     "score (before any flip) to <output_dir>/rollouts (for rlhf ilql and the like)")


@dataclass
class TrainerFields:
    """The fields of every model a command trains in its own process (learner/trainer.py), shared by the rm,
    sft and dpo sections; each section sets its own learning rate, epochs, batch size and length."""
    lr: float = opt(1e-5, "AdamW learning rate", gt=0.0, lt=1.0)
    epochs: int = opt(1, "passes over the training set", ge=1, le=100)
    batch_size: int = opt(8, "examples per optimiser step", ge=1)
    max_length: int = opt(256, "longest prompt (chat template) + reply, tokens", ge=16)
    max_grad_norm: float = opt(1.0, "gradient-norm clip", gt=0.0)
    dtype: str = opt("float32", "weight dtype while training", choices=DTYPES)
    autocast: str = opt("auto", AUTOCAST_HELP, choices=("auto", "none") + DTYPES)
    device: str = opt("cpu", "training device", choices=("cpu", "cuda"))
    threads: int = opt(2, "torch CPU threads", ge=1)
    seed: int = opt(0, "seed of the initialisation, the batch order and the held-out split")
    checkpoint_every: int = opt(0, "optimiser steps between checkpoints (model, optimiser, step) in "
                                   "<output_dir>/checkpoint.pt, and one at the end; 0: none", ge=0)
    resume: bool = opt(False, "continue from <output_dir>/checkpoint.pt (same data, epochs and batch size)")


@dataclass
class PolicyTrainerFields(TrainerFields):
    """The trainer fields of a stage that trains the policy (sft, dpo, ilql), with its LoRA option."""
    lora_rank: int = opt(0, "0 = full fine-tuning; r > 0 = train LoRA adapters of rank r (peft), merged into the "
                            "saved model", ge=0)
    lora_alpha: float = opt(16.0, LORA_ALPHA_HELP, gt=0.0)
    lora_targets: str = opt(LORA_TARGETS, LORA_TARGETS_HELP)
    num_learners: int = opt(1, "ranks that train together (Ray actors, one CPU or GPU each), the model sharded "
                               "across them with FSDP2 and every batch split among them", ge=1)


@dataclass
class RewardModelConfig(TrainerFields):
    base: str = opt("embedded:smollm2-135m-instruct", "LM under the scalar head (same forms as model.path)")
    output_dir: str = opt("runs/reward_model", "where the trained reward model (an HF directory) is saved")
    lr: float = opt(2e-5, "AdamW learning rate of the LM", gt=0.0, lt=1.0)
    head_lr: float = opt(1e-3, "AdamW learning rate of the freshly initialised scalar head", gt=0.0, lt=1.0)
    epochs: int = opt(2, "passes over the training pairs", ge=1, le=100)
    batch_size: int = opt(16, "pairs per optimiser step", ge=1)
    max_length: int = opt(256, "longest conversation, tokens; longer ones lose their end", ge=16)
    train_layers: int = opt(0, "train only the top k transformer blocks and the head; 0 = all", ge=0)
    num_layers: int = opt(0, "keep only the lowest k transformer blocks of the base (the reward model is that "
                          "deep); 0 = all", ge=0)
    pooling: str = opt("last", "where the scalar head reads: `last` token (transformers' default) or `mean` "
                       "over the response tokens", choices=("last", "mean"))


@dataclass
class SFTConfig(PolicyTrainerFields):
    path: str = opt("", "demonstrations (JSONL/JSON/Parquet/CSV or a Hub dataset): prompt/response columns, or a "
                        "messages column of role/content dialogues ending with the assistant's reply")
    eval_path: str = opt("", "held-out demonstrations; empty = hold out sft.eval_fraction of sft.path")
    eval_fraction: float = opt(0.1, "share of sft.path held out when sft.eval_path is empty", gt=0.0, lt=1.0)
    prompt_column: str = opt("prompt", "column of the requests (a string or role/content messages)")
    response_column: str = opt("response", "column of the demonstrated replies")
    messages_column: str = opt("messages", "column of whole dialogues, read instead of prompt/response when present")
    best_fraction: float = opt(1.0, "below 1: sft.path holds scored replies (a reward column, or a job's rollouts "
                                    "folder) and each prompt's best fraction of them by reward is trained on (filtered "
                                    "SFT); 1: every row", gt=0.0, le=1.0)
    reward_column: str = opt("reward", "column of each reply's reward, read when sft.best_fraction < 1")
    on_bad_row: str = opt("error", "a bad row (empty, missing reply, too long): `error` names them all; `skip` "
                                   "trains without them", choices=("error", "skip"))
    max_length: int = opt(256, "longest demonstration, prompt (chat template) + reply tokens", ge=16)
    epochs: int = opt(2, "passes over the demonstrations", ge=1, le=100)
    batch_size: int = opt(8, "demonstrations per optimiser step", ge=1)
    output_dir: str = opt("runs/sft", "where the fine-tuned policy (an HF directory for model.path) is saved")
    demo_samples: int = opt(8, "rlhf make-demos: samples per training prompt; the gold scorer's best is kept",
                            ge=1, le=64)
    num_demos: int = opt(256, "rlhf make-demos: demonstrations to make (training prompts, cycled)", ge=1)


@dataclass
class DPOConfig(PolicyTrainerFields):
    beta: float = opt(0.1, "DPO's beta: the strength of the implicit KL to the reference (larger = closer)", gt=0.0)
    lr: float = opt(5e-6, "AdamW learning rate", gt=0.0, lt=1.0)
    epochs: int = opt(1, "passes over the preference pairs (preferences.path)", ge=1, le=100)
    batch_size: int = opt(8, "pairs per optimiser step", ge=1)
    max_length: int = opt(256, "longest prompt (chat template) + reply, tokens, of either reply of a pair", ge=16)
    output_dir: str = opt("runs/dpo", "where the DPO policy (an HF directory for model.path) is saved")


@dataclass
class EloConfig:
    judge: str = opt("gold", "who decides a match: `gold` (train.gold_scorer), `reward` (reward.scorer), any "
                             "scorer spec (the higher score wins, equal is a tie), or `pairwise:<module>:<function>` "
                             "(function(prompt, a, b) -> probability that a is better)")
    num_prompts: int = opt(64, "held-out prompts each pair of policies is played on", ge=1)
    bootstrap: int = opt(200, "bootstrap refits for the 95% intervals", ge=10)
    output_dir: str = opt("runs/elo", "where ratings.json and ratings.png go")
    seed: int = opt(0, "seed of the bootstrap")


@dataclass
class OnlineRLHFConfig:
    rounds: int = opt(3, "rounds of PPO -> fresh pairs from the policy -> reward model trained again", ge=1, le=50)
    ppo_steps: int = opt(5, "PPO steps per round (the job continues from its last checkpoint)", ge=1)
    initial_pairs: int = opt(256, "labelled pairs of the initial policy's samples for the first reward model "
                                  "(when preferences.path is empty)", ge=2)
    pairs_per_round: int = opt(128, "labelled pairs sampled from the current policy each round", ge=2)
    eval_fraction: float = opt(0.25, "share of each round's pairs held out: the reward model's accuracy on the "
                                     "current policy's pairs", gt=0.0, lt=1.0)
    output_dir: str = opt("runs/online_rlhf", "the PPO run, each round's pairs and reward model, rounds.json")


@dataclass
class WestOfNConfig:
    n: int = opt(8, "samples per unlabelled prompt; the reward model's best and worst make a pair", ge=2, le=64)
    num_prompts: int = opt(512, "unlabelled prompts per round, cycled from data.path's training split", ge=1)
    quantile: float = opt(0.5, "keep pairs whose predicted preference probability is at or above this quantile "
                          "of all pairs (Pace et al. 2024); 0 keeps all", ge=0.0, lt=1.0)
    min_logprob: float = opt(-4.0, "drop responses whose mean per-token policy log-prob is below this; "
                             "-inf keeps all")
    rounds: int = opt(1, "self-training rounds: each round's reward model labels the next", ge=1, le=10)
    output_dir: str = opt("runs/west_of_n", "where each round's pairs and reward model go")


@dataclass
class BestOfNConfig:
    n: int = opt(16, "`rlhf best-of-n`: samples per prompt; reward.scorer picks the best", ge=1, le=1024)
    keep_rollouts: bool = opt(False, "write every sample with its reward.scorer score to <output_dir>/rollouts "
                                     "(for rlhf ilql, filtered SFT, DPO on scored replies)")
    output_dir: str = opt("runs/best_of_n", "where keep_rollouts writes")


@dataclass
class RMReportConfig:
    pairs: int = opt(256, "D, the gold-labelled pairs of the base reward model (and of each addition)", ge=2)
    eval_pairs: int = opt(256, "held-out gold-labelled pairs every reward model is judged on", ge=2)
    output_dir: str = opt("runs/rm_report", "where `rlhf rm-report` writes its pairs, models and results")


@dataclass
class ILQLConfig(PolicyTrainerFields):
    path: str = opt("", "scored replies: the rollouts folder of a job run with train.keep_rollouts=true, or any "
                        "data file (JSONL/JSON/Parquet/CSV) or Hub dataset with prompt, response and reward columns")
    prompt_column: str = opt("prompt", "column of the requests (a string or role/content messages)")
    response_column: str = opt("response", "column of the replies")
    reward_column: str = opt("reward", "column of each reply's reward")
    on_bad_row: str = opt("error", "a row without a reward, with a non-finite one, an empty response or one over "
                                   "max_length: `error` names them all; `skip` trains without them",
                          choices=("error", "skip"))
    eval_fraction: float = opt(0.05, "share of the replies held out for the held-out losses", gt=0.0, lt=1.0)
    heads: str = opt("mlp", "`mlp`: the paper's hidden -> 2 hidden -> out heads, decoded in the learner (higher "
                            "held-out gold and lower KL than linear on SmolLM2, README); `linear`: Q heads fold into "
                            "the LM head, an ordinary model that vLLM serves", choices=("linear", "mlp"))
    two_qs: bool = opt(True, "two Q heads, the smaller target taken (as the paper); false: one")
    tau: float = opt(0.7, "expectile of V's regression on the target Qs (0.5: their mean; toward 1: their best)",
                     gt=0.0, lt=1.0)
    gamma: float = opt(0.99, "discount per token", gt=0.0, le=1.0)
    cql_scale: float = opt(0.1, "weight of the CQL term", ge=0.0)
    awac_scale: float = opt(1.0, "weight of the language-model term on the data's tokens", ge=0.0)
    lm_term: str = opt("plain", "the language-model term: `plain` NLL, or `advantage`-weighted (AWAC: exp(Q - V), "
                                "clipped at 20)", choices=("plain", "advantage"))
    polyak: float = opt(1.0, "target Qs <- polyak Q + (1 - polyak) target at each sync (1: a copy)", gt=0.0, le=1.0)
    target_sync_every: int = opt(10, "optimiser steps between target syncs", ge=1)
    beta: float = opt(4.0, "decoding: logits + beta (Q - V); the saved policy's", ge=0.0)
    eval_betas: list[float] = opt([], "further betas judged after training from the same heads, e.g. [1, 8] (linear "
                                      "heads: each folded model saved to <output_dir>/beta-<b>)", ge=0.0)
    top_k: int = opt(20, "decoding: sample among the k likeliest perturbed tokens; 0: all", ge=0)
    lr: float = opt(1e-5, "AdamW learning rate of the LM", gt=0.0, lt=1.0)
    head_lr: float = opt(1e-4, "AdamW learning rate of the Q and V heads (they start at zero; 1e-3 made the Q loss "
                                "diverge on SmolLM2)", gt=0.0, lt=1.0)
    epochs: int = opt(1, "passes over the scored replies", ge=1, le=100)
    batch_size: int = opt(16, "replies per optimiser step", ge=1)
    max_length: int = opt(256, "longest prompt (chat template) + reply, tokens", ge=16)
    output_dir: str = opt("runs/ilql", "where the ILQL policy (linear heads: an HF directory for model.path) and its "
                                       "heads go")
