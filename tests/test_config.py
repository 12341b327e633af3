"""The run config: YAML + dotted overrides, typed, validated with errors that name the field."""

import dataclasses

import pytest

from cluster.cli import main
from cluster.commands import DEFAULT_CONFIG
from core.config import ConfigError, build_config, load_config
from tests.helpers import COMMAND_LINES

pytestmark = pytest.mark.pure


def test_the_default_job_is_the_configs_defaults_so_rlhf_config_shows_what_it_runs(capsys):
    default = load_config(DEFAULT_CONFIG)
    assert dataclasses.replace(default, rm=build_config({}).rm) == build_config({})  # all but the RM's shape
    assert (default.ppo.advantage, default.reference.placement, default.generation.samples_per_prompt,
            default.train.steps) == ("grpo", "learner", 4, 8)
    # the evaluation samples as the policy trains, unless told otherwise
    assert build_config({"generation": {"temperature": 0.7}}).train.eval_temperature == 0.7
    assert build_config({"generation": {"temperature": 0.7}, "train": {"eval_temperature": 1.0}}).train.eval_temperature == 1.0
    assert main(["config"]) == 0
    shown = capsys.readouterr().out
    assert "advantage = 'grpo'" in shown and "eval_temperature = 0.0 (here: 1.0)" in shown
    assert "autocast = 'auto' (here: " in shown and "pooling = 'mean'" in shown


def test_ptx_needs_a_demonstration_for_every_learner_rank():
    with pytest.raises(ConfigError, match=r"ppo.ptx_batch_size \(1\) must be at least ppo.num_learners \(2\)"):
        build_config({"ppo": {"num_learners": 2, "ptx_coef": 0.5, "ptx_path": "d.jsonl", "ptx_batch_size": 1}})


def test_default_yaml_loads_and_overrides_apply():
    cfg = load_config(DEFAULT_CONFIG, ["ppo.lr=3e-5", "generation.num_workers=3", "ppo.whiten_advantages=false"])
    assert cfg.model.path == "embedded:smollm2-135m-instruct"
    assert cfg.ppo.lr == pytest.approx(3e-5)
    assert cfg.generation.num_workers == 3 and isinstance(cfg.generation.num_workers, int)
    assert cfg.ppo.whiten_advantages is False
    # a list field takes a YAML list, one value, or nothing
    assert build_config({}, ["ilql.eval_betas=[1, 8.5]"]).ilql.eval_betas == [1.0, 8.5]
    assert build_config({}, ["ilql.eval_betas=2"]).ilql.eval_betas == [2.0]
    assert build_config({}, ["ilql.eval_betas="]).ilql.eval_betas == []


@pytest.mark.parametrize("override, words", [
    ("ppo.lr=-1", ["ppo.lr", "> 0"]),
    ("ppo.clip=1.5", ["ppo.clip", "< 1"]),
    ("generation.num_workers=0", ["generation.num_workers", ">= 1"]),
    ("generation.dtype=int8", ["generation.dtype", "bfloat16"]),
    ("ppo.lr=fast", ["ppo.lr", "float"]),
    ("generation.num_workers=1.5", ["generation.num_workers", "int"]),
    ("ppo.lr=nan", ["ppo.lr", "NaN"]),
    ("ilql.eval_betas=[1, -2]", ["ilql.eval_betas[1] = -2.0", ">= 0"]),
    ("ilql.eval_betas=[1, high]", ["ilql.eval_betas[1]", "float"]),
    ("ppo.learning_rate=1e-5", ["unknown config field ppo.learning_rate", "lr"]),
    ("optimizer.lr=1e-5", ["unknown config section 'optimizer'"]),
    ("lr=1e-5", ["section.field=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    for word in words:
        assert word in str(err.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="minibatch_size"):
        build_config({"ppo": {"minibatch_size": 64}, "train": {"prompts_per_step": 8}})
    with pytest.raises(ConfigError, match="max_model_len"):
        build_config({"data": {"max_prompt_tokens": 500}, "generation": {"max_model_len": 512}})
    with pytest.raises(ConfigError, match="autoscale_min_workers .0. must be between 1"):
        build_config({"generation": {"autoscale_max_workers": 4}})
    with pytest.raises(ConfigError, match=r"needs on-policy rollouts \(train.max_staleness = 0, it is 1\)"):
        build_config({"ppo": {"old_logprobs": "behaviour", "advantage": "reinforce_pp"}, "train": {"max_staleness": 1}})
    with pytest.raises(ConfigError, match="and no value head .* it is gae"):
        build_config({"ppo": {"old_logprobs": "behaviour", "advantage": "gae"}})
    assert build_config({"ppo": {"old_logprobs": "behaviour", "advantage": "reinforce_pp"}}).ppo.old_logprobs == "behaviour"
    assert build_config({"reference": {"placement": "learner"}}).reference_in_learner
    assert not build_config({"reference": {"placement": "actor"}}).reference_in_learner
    # auto: the workers' log-probs where they are the learner's own (float32 on both sides), else the learner's
    fp32 = {"generation": {"dtype": "float32", "samples_per_prompt": 2}, "ppo": {"autocast": "none", "advantage": "grpo"}}
    assert build_config(fp32).ppo.old_logprobs == "behaviour"
    for other in ({"generation": {"dtype": "bfloat16"}}, {"ppo": {"autocast": "bfloat16"}}, {"ppo": {"advantage": "gae"}},
                  {"train": {"max_staleness": 1}}, {"ppo": {"lora_rank": 8}}):
        mixed = {k: {**fp32.get(k, {}), **other.get(k, {})} for k in {*fp32, *other}}
        assert build_config(mixed).ppo.old_logprobs == "learner", other
    actor = {"reference": {"placement": "actor"}}
    assert build_config({**actor, "ppo": {"lora_rank": 8}}).reference_in_learner and not build_config(actor).reference_in_learner


def test_a_learner_group_needs_a_share_of_every_minibatch_per_rank():
    with pytest.raises(ConfigError, match=r"ppo.num_learners = 3, ppo.minibatch_size \(16\) must be a multiple"):
        build_config({"ppo": {"num_learners": 3}})
    assert build_config({"ppo": {"num_learners": 2, "minibatch_size": 16}}).ppo.num_learners == 2


def test_a_reward_server_beyond_loopback_needs_a_token(monkeypatch):
    from reward_server.server import resolve_secret

    with pytest.raises(ConfigError, match="reward.host = '0.0.0.0' listens beyond this machine; set reward.auth_token"):
        build_config({}, ["reward.host=0.0.0.0"])
    cfg = build_config({}, ["reward.host=0.0.0.0", "reward.auth_token=env:REWARD_TOKEN"])
    monkeypatch.setenv("REWARD_TOKEN", "t0k")
    assert resolve_secret(cfg.reward.auth_token) == "t0k" and resolve_secret("plain") == "plain"
    monkeypatch.delenv("REWARD_TOKEN")
    with pytest.raises(ValueError, match="REWARD_TOKEN is not set"):
        resolve_secret(cfg.reward.auth_token)


def test_resume_names_a_complete_checkpoint(tmp_path):
    from cluster.checkpoint import resume_from

    assert resume_from("", str(tmp_path)) is None and resume_from("auto", str(tmp_path)) is None
    for step, complete in [(2, True), (4, True), (6, False)]:
        path = tmp_path / "checkpoints" / f"step-{step:06d}"
        path.mkdir(parents=True)
        if complete:
            (path / "meta.json").write_text("{}")
    assert resume_from("auto", str(tmp_path)) == str(tmp_path / "checkpoints" / "step-000004")  # step 6 was never finished
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resume_from(str(tmp_path / "checkpoints" / "step-000006"), str(tmp_path))


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtypes_use_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    import core.config

    monkeypatch.setattr(core.config, "native_bf16", lambda device: device == "cuda" or native)
    cfg = build_config({})
    half = "bfloat16" if native else None
    assert cfg.generation.dtype == (half or "float32")
    assert (cfg.ppo.autocast, cfg.rm.autocast) == (half or "none",) * 2
    # every stage that trains in its own process (rm, sft, dpo, ilql: the trainer fields) resolves its own
    assert {cfg.sft.autocast, cfg.dpo.autocast, cfg.ilql.autocast} == {half or "none"}
    # on CUDA it is bf16 whatever the CPU; an explicit value is kept
    cfg = build_config({"generation": {"device": "cuda"}, "ppo": {"autocast": "float16"}})
    assert (cfg.generation.dtype, cfg.ppo.autocast, cfg.rm.autocast) == ("bfloat16", "float16", half or "none")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["train", "--config", str(DEFAULT_CONFIG), "ppo.epochs=0"]) == 2
    assert "ppo.epochs = 0 is out of range" in capsys.readouterr().err


def test_cli_lists_every_field_with_help(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "max_staleness = 0: 0 = on-policy" in out and "kl_target" in out


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of Ray fails the test: a bad input must be refused before it."""
    import ray

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))


def test_ppo_refuses_nucleus_sampling_with_the_reason(capsys, no_ray):
    """top_p < 1 samples from a truncated distribution the learner does not model; best-of-n may use it. `rlhf
    config` and `rlhf plan`, which describe the PPO job, refuse it as `rlhf train` does."""
    for command in (["train"], ["config"], ["plan", "--model", "cluster/configs/shapes/llama-3.2-1b"]):
        assert main([*command, "generation.top_p=0.9"]) == 2
        err = capsys.readouterr().err
        assert "generation.top_p = 0.9 but PPO needs 1.0" in err and "best-of-n" in err
    assert load_config(DEFAULT_CONFIG, ["generation.top_p=0.9"]).generation.top_p == 0.9


@pytest.mark.parametrize("override, says", [
    ("reward.scorer=vadr", "unknown scorer 'vadr'; use `vader`"),
    ("reward.scorer=python:no_such_module_here:score", "cannot import module 'no_such_module_here'"),
    ("train.gold_scorer=python:reward_server.scorers:no_such_scorer", "has no function 'no_such_scorer'"),
    ("preferences.labeller=python:reward_server", "must look like module.path:function"),
    ("reward.scorer=model:/no/such/reward_model", "'/no/such/reward_model' is not a directory"),
    ("reward.scorer=model:cluster/configs/shapes/llama-3.2-1b", "holds no weights"),
    ("elo.judge=pairwise:no_such_module_here:better", "cannot import module 'no_such_module_here'"),
    ("elo.judge=python:reward_server.scorers:no_such_scorer", "has no function 'no_such_scorer'"),
    ("model.path=/no/such/policy", "'/no/such/policy' is not a directory"),
    ("model.path=cluster/configs", "holds no config.json"),
    ("model.path=embedded:smollm3", "names no embedded model; choose one of embedded:smollm2-135m-instruct"),
    ("rm.base=/no/such/base", "'/no/such/base' is not a directory"),
    ("data.path=no/such/prompts.jsonl", "no such file"),
    ("data.eval_path=held_out.csv", "no such file"),
])
def test_a_misspelt_scorer_judge_or_model_is_refused_by_every_command_before_anything_starts(override, says, capsys,
                                                                                             no_ray):
    field = override.split("=")[0]
    for command in COMMAND_LINES:
        assert main([*command, override]) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"rlhf: {field} = ") and says in err, (command, err)


def test_specs_that_name_something_usable_pass(tmp_path):
    """A reward model directory is checked for its files, not loaded; a function is imported, not called."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = load_config(DEFAULT_CONFIG, [f"reward.scorer=model:{tmp_path}", f"model.path={tmp_path}",
                                       "train.gold_scorer=python:reward_server.scorers:no_negative_word",
                                       "elo.judge=reward"])
    assert cfg.reward.scorer == f"model:{tmp_path}"


def test_bad_input_exits_2_with_one_line_and_no_traceback():
    """As a user runs it: the command's own process, nothing started, the message alone."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "reward.scorer=python:no_such_module:f"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("rlhf: reward.scorer = 'python:no_such_module:f': cannot import module")
    assert "Traceback" not in done.stderr and "Ray" not in done.stderr + done.stdout


@pytest.mark.parametrize("depth, workers, change", [
    (10, 2, +1),  # less than a batch (16) waiting: generation is the bottleneck
    (10, 4, 0),  # ... but already at the most workers
    (40, 3, -1),  # two batches waiting: workers sit idle behind a full buffer
    (40, 1, 0),  # ... but already at the fewest
    (20, 2, 0),  # between one and two batches: leave it
])
def test_autoscale_step_follows_the_buffer_depth(depth, workers, change):
    from actors.worker_pool import autoscale_step

    assert autoscale_step(depth, batch=16, workers=workers, fewest=1, most=4) == change


def test_nccl_weight_transfer_needs_cuda_full_fine_tuning_and_fixed_workers():
    with pytest.raises(ConfigError, match="not ppo.device = cpu, generation.device = cpu; use ppo.weight_transfer"):
        build_config({"ppo": {"weight_transfer": "nccl"}})
    cuda = {"ppo": {"weight_transfer": "nccl", "device": "cuda"}, "generation": {"device": "cuda"}}
    assert build_config(cuda).ppo.weight_transfer == "nccl"
    with pytest.raises(ConfigError, match="not ppo.lora_rank = 8, generation.autoscale_max_workers = 4"):
        build_config({"ppo": {**cuda["ppo"], "lora_rank": 8},
                      "generation": {"device": "cuda", "autoscale_min_workers": 1, "autoscale_max_workers": 4}})


def test_group_estimators_need_several_samples_per_prompt():
    for estimator in ("grpo", "rloo"):
        with pytest.raises(ConfigError, match=f"ppo.advantage = {estimator} compares the responses to one prompt"):
            build_config({"ppo": {"advantage": estimator}, "generation": {"samples_per_prompt": 1}})
    cfg = build_config({"ppo": {"advantage": "grpo"}, "generation": {"samples_per_prompt": 4}})
    assert cfg.ppo.advantage == "grpo"
    assert build_config({"ppo": {"advantage": "reinforce_pp"}}).ppo.advantage == "reinforce_pp"


def test_a_stage_on_several_ranks_does_not_checkpoint_yet():
    with pytest.raises(ConfigError, match="ilql.num_learners = 2 with checkpoints"):
        build_config({}, ["ilql.num_learners=2", "ilql.checkpoint_every=5"])
    assert build_config({}, ["sft.num_learners=2"]).sft.num_learners == 2


def test_inflight_updates_need_staleness_and_full_fine_tuning():
    with pytest.raises(ConfigError, match=r"set train.max_staleness >= 1 \(it is 0\)"):
        build_config({"generation": {"inflight_updates": True}})
    on = {"generation": {"inflight_updates": True}, "train": {"max_staleness": 1}}
    assert build_config(on).generation.inflight_updates
    with pytest.raises(ConfigError, match=r"does not work with LoRA yet \(ppo.lora_rank = 8\)"):
        build_config({**on, "ppo": {"lora_rank": 8}})
