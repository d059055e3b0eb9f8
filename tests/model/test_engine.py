"""The training engine: deterministic batches, resume, accumulation, clear failures,
per-epoch augmentation in workers, no host sync per step, worker/decode resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xlearner.checkpoint import Checkpointer
from xlearner.config import EngineConfig, TrainConfig
from xlearner.engine import LossWindow, Trainer
from xlearner.loaders import (
    StepBatchSampler,
    Stream,
    resolve_decode,
    resolve_num_workers,
    stage_cores,
)
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
    keyed = next(iter(StepBatchSampler(10, 4, seed=3, start_step=2, with_epochs=True)))
    assert keyed == [(0, first[2][0]), (0, first[2][1]), (1, first[2][2]), (1, first[2][3])]
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
    with pytest.raises(FloatingPointError, match="loss is nan at step 1; lower the learning rate"):
        Trainer(model, streams(), TrainConfig(steps=2, batch_size=4), ENGINE).fit()


class Counting(LinearModel):
    """Diverges from the first step; counts its forward calls."""

    def __init__(self):
        super().__init__(scale=float("inf"))
        self.calls = 0

    def forward(self, images, stream, targets):
        self.calls += 1
        return super().forward(images, stream, targets)


def test_non_finite_loss_is_read_at_the_next_log_step_or_at_once_when_failing_fast(
    tmp_path, monkeypatch
):
    """The device-side flag is read at log steps and before checkpoints, not every step;
    the error still names the first bad step. fail_fast / XLEARNER_FAIL_FAST read it
    after every step."""
    quiet = EngineConfig(device="cpu", log_every_steps=4, checkpoint_every_steps=100)
    cfg = TrainConfig(steps=6, batch_size=4)
    model = Counting()
    with pytest.raises(FloatingPointError, match="at step 1; lower"):
        Trainer(model, streams(), cfg, quiet).fit()
    assert model.calls == 4 * 2  # ran to the log step at 4 (2 streams per step)
    store = LocalStore(tmp_path)
    model = Counting()
    with pytest.raises(FloatingPointError, match="at step 1; lower"):
        Trainer(
            model,
            streams(),
            cfg,
            quiet.model_copy(update={"checkpoint_every_steps": 2}),
            checkpointer=Checkpointer(store, "ck"),
        ).fit()
    assert model.calls == 2 * 2 and Checkpointer(store, "ck").latest() is None  # none saved
    model = Counting()
    with pytest.raises(FloatingPointError, match="at step 1; lower"):
        Trainer(model, streams(), cfg, quiet, fail_fast=True).fit()
    assert model.calls == 2
    monkeypatch.setenv("XLEARNER_FAIL_FAST", "1")
    model = Counting()
    with pytest.raises(FloatingPointError, match="at step 1; lower"):
        Trainer(model, streams(), cfg, quiet).fit()
    assert model.calls == 2


def test_losses_are_averaged_on_the_device_between_log_steps():
    window = LossWindow(torch.device("cpu"))
    for step, value in enumerate([1.0, 2.0, 6.0], 1):
        window.add(step, {"loss": torch.tensor(value), "a/loss": torch.tensor(value * 2)})
    window.check("x")
    assert window.read() == {"loss": 3.0, "a/loss": 6.0}
    window.add(4, {"loss": torch.tensor(5.0)})
    assert window.read() == {"loss": 5.0}
    seen = []
    Trainer(
        LinearModel(),
        streams(),
        TrainConfig(steps=5, batch_size=4),
        EngineConfig(device="cpu", log_every_steps=2),
        on_metrics=lambda metrics, step: seen.append((step, sorted(metrics))),
    ).fit()
    keys = ["lr", "train/blobs:cls/loss", "train/loss", "train/more:cls/loss"]
    assert seen == [(2, keys), (4, keys), (5, keys)]


class Jittered(Dataset):
    """An 'augmenting' dataset: noise drawn from (seed, epoch, index), like ShardDataset."""

    def __init__(self, n: int = 8):
        self.base = Blobs(n)
        self.epoch, self.seed = 0, 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch * 100 + i)
        x, target = self.base[i]
        return x + torch.randn(x.shape, generator=gen), {**target, "index": torch.tensor(i)}


class Recording(LinearModel):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, images, stream, targets):
        self.seen += [(int(i), x.clone()) for i, x in zip(targets["index"], images, strict=True)]
        return super().forward(images, stream, targets)


def collate_indexed(items):
    images, targets = collate(items)
    return images, {**targets, "index": torch.stack([t["index"] for _, t in items])}


def seen_images(seed: int, workers: int) -> list[tuple[int, torch.Tensor]]:
    model = Recording()
    stream = Stream("jit:cls", "cls", Jittered(8), None, collate_indexed)
    engine = EngineConfig(device="cpu", num_workers=workers, log_every_steps=100)
    # batch 3 over 8 images: batches straddle the epochs (step 3 holds epochs 0 and 1)
    Trainer(model, [stream], TrainConfig(steps=6, batch_size=3), engine, seed=seed).fit()
    return model.seen


def test_augmentation_follows_the_epoch_and_the_seed_in_workers_too():
    seen = seen_images(seed=5, workers=0)
    assert len(seen) == 18  # 2 epochs of 8 images and 2 of the third epoch
    by_index: dict[int, list[torch.Tensor]] = {}
    for i, x in seen:
        by_index.setdefault(i, []).append(x)
    assert all(len(xs) >= 2 for xs in by_index.values())
    assert all(not torch.equal(xs[0], xs[1]) for xs in by_index.values())  # epoch 0 vs 1
    again = seen_images(seed=5, workers=0)
    assert [i for i, _ in again] == [i for i, _ in seen]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(again, seen, strict=True))
    in_workers = seen_images(seed=5, workers=2)
    assert [i for i, _ in in_workers] == [i for i, _ in seen]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(in_workers, seen, strict=True))
    other = seen_images(seed=6, workers=0)
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(other, seen, strict=True))


def test_num_workers_auto(monkeypatch):
    auto = EngineConfig()
    assert auto.num_workers == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    for var in ("XLEARNER_PARALLEL_STAGES", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert stage_cores() == 16
    assert resolve_num_workers(auto, cpu) == 0  # CPU training: the cores train
    assert resolve_num_workers(auto, cuda) == 15  # one core for the main process
    assert resolve_num_workers(auto, cuda, streams=4) == 3
    assert resolve_num_workers(auto, cuda, streams=40) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the flow's per-stage share
    assert stage_cores() == 4 and resolve_num_workers(auto, cuda) == 3
    monkeypatch.setenv("XLEARNER_PARALLEL_STAGES", "8")  # wins over OMP_NUM_THREADS
    assert stage_cores() == 2 and resolve_num_workers(auto, cuda) == 1
    monkeypatch.setenv("XLEARNER_PARALLEL_STAGES", "16")
    assert stage_cores() == 1 and resolve_num_workers(auto, cuda) == 0  # < 2 cores
    monkeypatch.delenv("XLEARNER_PARALLEL_STAGES")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: OMP_NUM_THREADS is its own
    assert stage_cores() == 8
    assert resolve_num_workers(EngineConfig(num_workers=3), cpu) == 3  # given: as given


def test_decode_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert EngineConfig().decode == "cpu"
    assert resolve_decode(EngineConfig(), cpu) is False
    assert resolve_decode(EngineConfig(decode="auto"), cpu) is False
    with pytest.raises(RuntimeError, match="engine.decode is 'gpu' but training runs on cpu"):
        resolve_decode(EngineConfig(decode="gpu"), cpu)


def test_no_streams_is_an_error():
    with pytest.raises(ValueError, match="no data streams"):
        Trainer(LinearModel(), [], TrainConfig(), ENGINE)
