"""The training engine: deterministic batches, resume, accumulation, clear failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xlearner.config import EngineConfig, TrainConfig
from xlearner.engine import Checkpointer, StepBatchSampler, Stream, Trainer
from xlearner.store import LocalStore

ENGINE = EngineConfig(device="cpu", log_every_steps=1, checkpoint_every_steps=3)


class Blobs(Dataset):
    """Two Gaussian blobs as tiny 'images'."""

    def __init__(self, n: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        self.x = torch.randn(n, 3, 4, 4, generator=gen) + self.y.view(-1, 1, 1, 1) * 2.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], {"label": self.y[i]}


def collate(items):
    return torch.stack([x for x, _ in items]), {
        "label": torch.stack([t["label"] for _, t in items])
    }


class LinearModel(nn.Module):
    """The engine's model contract: model(images, stream, targets) -> named losses."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(48, 2)
        self.scale = scale

    def forward(self, images, stream, targets):
        logits = self.fc(images.flatten(1)) * self.scale
        return {"ce": nn.functional.cross_entropy(logits, targets["label"])}


def streams(n: int = 64) -> list[Stream]:
    return [
        Stream("blobs:cls", "cls", Blobs(n), None, collate),
        Stream("more:cls", "cls", Blobs(2 * n, 1), None, collate),
    ]


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    sampler = StepBatchSampler(10, 4, seed=3)
    first = [sampler.batch(s) for s in range(5)]
    again = StepBatchSampler(10, 4, seed=3, start_step=2)
    assert [next(iter(again)) for _ in range(1)][0] == first[2]
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert StepBatchSampler(10, 4, seed=4).batch(0) != first[0]


def test_resumed_training_ends_exactly_where_uninterrupted_training_does(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=8, lr=0.05, warmup_steps=1)
    straight = LinearModel()
    Trainer(straight, streams(), cfg, ENGINE, seed=1).fit()

    class Killed(Exception):
        pass

    def kill_after_step_4(metrics, step):
        if step == 4:  # the checkpoint of step 3 is the newest one
            raise Killed

    store = LocalStore(tmp_path)
    with pytest.raises(Killed):
        Trainer(
            LinearModel(),
            streams(),
            cfg,
            ENGINE,
            seed=1,
            checkpointer=Checkpointer(store, "ck"),
            on_metrics=kill_after_step_4,
        ).fit()
    # A restarted process rebuilds the model from scratch and finds the checkpoint.
    resumed = LinearModel()
    trainer = Trainer(
        resumed, streams(), cfg, ENGINE, seed=1, checkpointer=Checkpointer(store, "ck")
    )
    assert trainer.fit() == 3
    assert torch.equal(weights(resumed), weights(straight))
    assert Checkpointer(store, "ck").latest()["step"] == 6


def test_gradient_accumulation_matches_the_large_batch():
    large, accumulated = LinearModel(), LinearModel()
    Trainer(
        large,
        streams()[:1],
        TrainConfig(steps=4, batch_size=8, optimizer="sgd", lr=0.1, warmup_steps=0),
        ENGINE,
    ).fit()
    Trainer(
        accumulated,
        streams()[:1],
        TrainConfig(
            steps=4, batch_size=4, grad_accum_steps=2, optimizer="sgd", lr=0.1, warmup_steps=0
        ),
        ENGINE,
    ).fit()
    assert torch.allclose(weights(large), weights(accumulated), atol=1e-6)


def test_proportional_sampling_draws_streams_by_size():
    trainer = Trainer(
        LinearModel(), streams(32), TrainConfig(steps=1, sampling="proportional"), ENGINE
    )
    schedule = trainer._stream_schedule()
    picks = [schedule(step)[0].name for step in range(600)]
    share = picks.count("more:cls") / len(picks)
    assert 0.58 < share < 0.75  # sizes 64 vs 32 -> 2/3


def test_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    store = LocalStore(tmp_path)
    Trainer(
        LinearModel(),
        streams(),
        TrainConfig(steps=3, batch_size=4),
        ENGINE,
        checkpointer=Checkpointer(store, "ck"),
    ).fit()

    class Other(LinearModel):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="does not match the model"):
        Trainer(
            Other(),
            streams(),
            TrainConfig(steps=6, batch_size=4),
            ENGINE,
            checkpointer=Checkpointer(store, "ck"),
        ).fit()


def test_diverging_loss_stops_with_a_hint():
    model = LinearModel(scale=float("inf"))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        Trainer(model, streams(), TrainConfig(steps=2, batch_size=4), ENGINE).fit()


def test_no_streams_is_an_error():
    with pytest.raises(ValueError, match="no data streams"):
        Trainer(LinearModel(), [], TrainConfig(), ENGINE)
