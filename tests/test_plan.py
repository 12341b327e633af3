"""`rlhf plan`: parameter counts of the shipped Llama shapes match their published sizes, the learner's
weights + gradients + optimizer per rank match what a learner holds after an update (within 20%), sharding
divides them, and a directory without a config.json is refused."""

from pathlib import Path

import pytest

from cluster.cli import main
from cluster.models import prepare_tiny
from cluster.plan import learner_rank, model_shape
from core.config import ConfigError, build_config
from tests.helpers import make_learner, rollouts

SHAPES = Path(__file__).parent.parent / "cluster" / "configs" / "shapes"


@pytest.mark.parametrize("name, billions", [("llama-3.2-1b", 1.24), ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55)])
def test_the_llama_shapes_have_their_published_sizes(name, billions):
    assert model_shape(str(SHAPES / name)).parameters / 1e9 == pytest.approx(billions, abs=0.01)


def test_the_plan_matches_what_the_learner_holds_and_sharding_divides_it():
    tiny = str(prepare_tiny())
    learner = make_learner(tiny)
    learner.update(rollouts(learner))
    held = learner.memory()
    # as make_learner builds it: GAE with a value head, no frozen reference copy
    cfg = build_config({"ppo": {"autocast": "none", "advantage": "gae"}, "reference": {"placement": "actor"}})
    one, two = learner_rank(model_shape(tiny), cfg, 1), learner_rank(model_shape(tiny), cfg, 2)
    for kind in ("weights", "gradients", "optimizer"):
        assert one[kind] == pytest.approx(held[kind], rel=0.2)
        assert two[kind] == pytest.approx(one[kind] / 2)
    assert two["activations"] == pytest.approx(one["activations"] / 2)  # each rank takes half the rows


def test_plan_prints_the_roles_and_refuses_a_directory_without_a_config(tmp_path, capsys):
    assert main(["plan", "--model", str(SHAPES / "llama-3.1-8b"), "--device-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "smallest learner group on 80 GiB devices:" in out
    with pytest.raises(ConfigError, match="no config.json there"):
        model_shape(str(tmp_path))


def test_the_lora_plan_matches_what_a_lora_learner_holds():
    tiny = str(prepare_tiny())
    learner = make_learner(tiny, lora_rank=4)
    learner.update(rollouts(learner))
    held = learner.memory()
    plan = learner_rank(model_shape(tiny), build_config({"ppo": {"autocast": "none", "lora_rank": 4}}), 1)
    for kind in ("weights", "gradients", "optimizer"):
        assert plan[kind] == pytest.approx(held[kind], rel=0.2)
    assert plan["optimizer"] < plan["weights"] / 10
