"""The one fine-tuning loop (learner/trainer.py) that SFT, DPO and the reward model share, on a model small
enough to check by hand: what each epoch reports, the learning-rate schedule, the gradient clip."""

import pytest
import torch

from core.errors import InputError
from core.pipeline_config import RewardModelConfig
from learner.trainer import Trainer, seed_and_threads

pytestmark = pytest.mark.pure


class Line(Trainer):
    """y = w x fitted to y = 2x: the loss is the mean squared error of a batch of x values."""
    name = "line"

    def __init__(self, cfg, **flags):
        for k, v in flags.items():
            setattr(self, k, v)
        seed_and_threads(cfg)
        model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        super().__init__(cfg, model, tokenizer=None)

    def loss(self, batch):
        x = torch.tensor(batch).unsqueeze(-1)
        return ((self.model(x) - 2 * x) ** 2).mean(), {"train/w": self.model.weight.item()}

    def evaluate(self, examples):
        with torch.no_grad():
            return {"eval/loss": self.loss(examples)[0].item()}


def cfg(**fields):
    return RewardModelConfig(**{"lr": 0.1, "epochs": 3, "batch_size": 2, "threads": 1, **fields})


def test_each_epoch_reports_its_training_means_and_the_held_out_figures():
    history = Line(cfg()).train([1.0, 2.0, 3.0, 4.0], held_out=[5.0])
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[0] == {"epoch": 0, "eval/loss": 100.0}  # w = 0: (0 - 2 * 5)^2
    assert history[-1]["eval/loss"] < history[1]["eval/loss"] < history[0]["eval/loss"]
    assert set(history[1]) == {"epoch", "train/loss", "train/w", "eval/loss"}
    # no held-out examples: no held-out figures, and no epoch 0
    assert [set(h) for h in Line(cfg()).train([1.0, 2.0], held_out=[])] == [{"epoch", "train/loss", "train/w"}] * 3
    with pytest.raises(ValueError, match="nothing to train on"):
        Line(cfg()).train([], held_out=[1.0])


def test_warm_up_then_linear_decay_to_zero():
    trainer = Line(cfg(epochs=20, batch_size=1), warmup_decay=True, evaluate_first=False)
    rates = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: rates.append(opt.param_groups[0]["lr"]))
    trainer.train([1.0, 2.0], held_out=[])
    # 40 steps: 2 of warm-up (5%), then down to zero at the end
    assert rates[:3] == pytest.approx([0.05, 0.1, 0.1 * 38 / 38])
    assert rates[-1] == pytest.approx(0.1 * 1 / 38) and all(a >= b for a, b in zip(rates[2:], rates[3:]))


def test_the_gradient_is_clipped_to_max_grad_norm():
    """AdamW's first step moves w by lr whatever the gradient's size, so the clip is checked on the gradient."""
    trainer = Line(cfg(max_grad_norm=0.5, epochs=1, batch_size=1))
    norms = []
    trainer.optimizer.register_step_pre_hook(lambda *_: norms.append(trainer.model.weight.grad.norm().item()))
    trainer.train([10.0], held_out=[])
    assert norms == [pytest.approx(0.5)]  # the gradient was 2 * (0 - 20) * 10 = -400


def test_a_resumed_run_takes_the_batches_it_had_not_and_ends_where_an_uninterrupted_one_does(tmp_path):
    data = [1.0, 2.0, 3.0, 4.0, 5.0]  # 3 batches an epoch, 9 steps in all
    seen: list[list[float]] = []

    class Recorded(Line):
        def loss(self, batch):
            seen.append(list(batch))
            return super().loss(batch)

    whole = Recorded(cfg(output_dir=str(tmp_path / "whole")), warmup_decay=True)
    whole.train(data, held_out=[])
    batches_whole, w_whole = list(seen), whole.model.weight.item()

    class Killed(Exception):
        pass

    class Interrupted(Recorded):
        def after_step(self):
            if self.steps == 5:
                raise Killed  # after step 5's update, before its checkpoint; the last one is after step 4

    out = str(tmp_path / "run")
    seen.clear()
    with pytest.raises(Killed):
        Interrupted(cfg(output_dir=out, checkpoint_every=2), warmup_decay=True).train(data, held_out=[])
    seen.clear()
    resumed = Recorded(cfg(output_dir=out, checkpoint_every=2, resume=True), warmup_decay=True)
    history = resumed.train(data, held_out=[])
    assert seen == batches_whole[4:]  # steps 5 to 9, in the first run's order
    assert resumed.steps == 9 and [h["epoch"] for h in history] == [2, 3]
    assert resumed.model.weight.item() == pytest.approx(w_whole, abs=1e-6)  # the optimiser's moments came back
    # another batch size would point the step count at other batches: refused
    with pytest.raises(InputError, match="batch_size"):
        Recorded(cfg(output_dir=out, batch_size=3, resume=True)).train(data, held_out=[])
    with pytest.raises(InputError, match="no checkpoint"):
        Recorded(cfg(output_dir=str(tmp_path / "none"), resume=True)).train(data, held_out=[])
