"""Feature extraction and the L-BFGS linear probe (xlearner/transfer/probe.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from xlearner.transfer.probe import (
    UnseenClassesError,
    _fit_softmax_regression,
    extract_features,
    fit_linear_probe,
    stratified_split,
)

GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def clusters(n: int, d: int, classes: int, separation: float, seed: int):
    """Unit-variance Gaussian clusters, centres ``separation`` noise-stds from the origin."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=generator)
    centres = separation * centres / centres.norm(dim=1, keepdim=True)
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, d, generator=generator), labels


def test_separable_features_reach_full_accuracy():
    x, y = clusters(600, 16, 4, separation=12.0, seed=0)
    result = fit_linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=4)
    assert result.top1 >= 99.0
    assert (result.num_train, result.num_val) == (400, 200)
    assert result.seconds > 0


def test_random_labels_give_chance_accuracy():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 8, generator=generator)
    y = torch.randint(4, (4000,), generator=generator)
    result = fit_linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], num_classes=4)
    # 2000 val labels: the standard deviation of chance accuracy is ~1 point.
    assert abs(result.top1 - 25.0) < 4.0


def test_l2_is_chosen_from_the_grid_by_selection_accuracy():
    x, y = clusters(300, 64, 4, separation=2.0, seed=2)
    result = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], num_classes=4, l2_grid=GRID)
    assert set(result.sweep) == set(GRID)
    assert all(0.0 <= acc <= 100.0 for acc in result.sweep.values())
    assert result.l2 == max(GRID, key=lambda v: (result.sweep[v], v))


def test_single_l2_skips_the_sweep():
    x, y = clusters(100, 8, 2, separation=4.0, seed=3)
    result = fit_linear_probe(x[:60], y[:60], x[60:], y[60:], num_classes=2, l2_grid=[0.05])
    assert result.l2 == 0.05 and result.sweep == {}


def test_same_seed_gives_the_same_result():
    x, y = clusters(400, 32, 5, separation=2.5, seed=4)

    def run(seed: int):
        result = fit_linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=5, seed=seed)
        return dataclasses.replace(result, seconds=0.0)

    assert run(7) == run(7)


def test_stratified_split_holds_out_each_class_deterministically():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, held = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(torch.sort(torch.cat([fit, held])).values, torch.arange(16))
    assert labels[held].tolist() == [0, 0, 1]  # 2 of 10, 1 of 5, the single 2 stays in fit
    again = stratified_split(labels, 0.2, seed=0)
    assert torch.equal(fit, again[0]) and torch.equal(held, again[1])


def test_val_classes_missing_from_train_are_named():
    x, y = clusters(120, 8, 5, separation=4.0, seed=5)
    keep = (y != 2) & (y != 4)
    with pytest.raises(UnseenClassesError, match=r"\[2, 4\]") as info:
        fit_linear_probe(x[keep][:60], y[keep][:60], x[60:], y[60:], num_classes=5)
    assert isinstance(info.value, ValueError) and info.value.classes == [2, 4]


@pytest.mark.parametrize(
    ("train_x", "train_y", "val_x", "match"),
    [
        (torch.randn(10, 4), torch.arange(10) % 2, torch.randn(6, 5), "4 dims .* 5"),
        (torch.randn(10, 4), torch.arange(9) % 2, torch.randn(6, 4), "10 rows .* 9 labels"),
        (torch.randn(10, 4, 1), torch.arange(10) % 2, torch.randn(6, 4), r"train_x .*\[N, D\]"),
        (torch.randn(10, 4), (torch.arange(10) % 2).float(), torch.randn(6, 4), "integer"),
        (torch.randn(10, 4), torch.arange(10) % 3, torch.randn(6, 4), r"\[0, 2\)"),
        (torch.full((10, 4), float("nan")), torch.arange(10) % 2, torch.randn(6, 4), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(train_x, train_y, val_x, match):
    with pytest.raises(ValueError, match=match):
        fit_linear_probe(train_x, train_y, val_x, torch.arange(6) % 2, num_classes=2)


def test_objective_matches_scikit_learn():
    """Same objective as sklearn's LogisticRegression with C = 1 / (l2 n): same optimum."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = clusters(400, 20, 3, separation=2.0, seed=6)
    x = (x - x.mean(0)) / x.std(0, correction=0)
    l2 = 1e-2

    def objective(weight, bias):
        logits = x.double() @ weight.double().T + bias.double()
        ce = torch.nn.functional.cross_entropy(logits, y)
        return (ce + 0.5 * l2 * weight.double().square().sum()).item()

    weight, bias, _ = _fit_softmax_regression(x, y, 3, l2, max_iter=500)
    reference = linear_model.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-8, max_iter=5000)
    reference.fit(x.double().numpy(), y.numpy())
    ref_weight = torch.from_numpy(reference.coef_)
    ref_bias = torch.from_numpy(reference.intercept_)
    assert objective(weight, bias) == pytest.approx(objective(ref_weight, ref_bias), rel=1e-4)
    assert torch.allclose(weight.double(), ref_weight, atol=2e-2)


class LevelBackbone(nn.Module):
    """Returns four "levels" whose spatial means are known: level i = (i + 1) * x."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return [(i + 1) * self.scale * x for i in range(4)]


def test_extract_features_pools_the_chosen_level_in_eval_mode():
    images = torch.rand(10, 3, 4, 4)
    labels = torch.arange(10) % 3
    loader = torch.utils.data.DataLoader(
        [(img, {"label": lab}) for img, lab in zip(images, labels, strict=True)], batch_size=4
    )
    backbone = LevelBackbone().train()
    features, got_labels = extract_features(backbone, loader, "cpu", level=3)
    assert features.dtype == torch.float32 and got_labels.dtype == torch.int64
    assert torch.allclose(features, 3 * images.mean(dim=(2, 3)))
    assert torch.equal(got_labels, labels)
    assert backbone.modes == [False, False, False] and backbone.training


def test_extract_features_rejects_bad_level_and_targets():
    backbone = LevelBackbone()
    with pytest.raises(ValueError, match="level must be one of 1..4"):
        extract_features(backbone, [], "cpu", level=5)
    loader = [(torch.rand(2, 3, 4, 4), {"mask": torch.zeros(2, 4, 4)})]
    with pytest.raises(ValueError, match="classification loader.*'mask'"):
        extract_features(backbone, loader, "cpu")
    with pytest.raises(ValueError, match="no batches"):
        extract_features(backbone, [], "cpu")
