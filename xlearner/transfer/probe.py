"""Linear-probe transfer of a frozen backbone to a downstream classification set.

Sections:
- feature extraction: frozen backbone -> globally pooled features;
- linear probe: multinomial logistic regression fitted with full-batch L-BFGS, its L2
  strength chosen on a held-out part of the train features;
- :func:`probe_top1`: both on a downstream source's manifest (what the stage reports).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.config import PipelineConfig
from xlearner.data.shards import ShardDataset, collate_fn

logger = logging.getLogger("xlearner.transfer")

LEVEL_NAMES = {1: "C2", 2: "C3", 3: "C4", 4: "C5"}
LEVEL_OF_NAME = {name: level for level, name in LEVEL_NAMES.items()}
PROGRESS_EVERY_S = 10.0


# --------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------


def _labels_of(targets: object) -> Tensor:
    """The class labels of a collated ``cls`` batch (``{"label": [B]}``, or a bare tensor)."""
    labels = targets.get("label") if isinstance(targets, dict) else targets
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError(
            "extract_features needs a classification loader whose batches are "
            "(images, {'label': int64 [B]}); got targets of type "
            f"{type(targets).__name__}"
            + (f" with keys {sorted(targets)}" if isinstance(targets, dict) else "")
        )
    return labels.to("cpu", torch.int64)


def _num_images(loader: Iterable) -> int | None:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset without a length
        return None


def extract_features(
    backbone: nn.Module, loader: Iterable, device: torch.device | str, level: int = 4
) -> tuple[Tensor, Tensor]:
    """Globally average-pooled features of feature level ``level`` (1..4 = C2..C5).

    The backbone runs in eval mode under ``torch.inference_mode`` (bf16 autocast on
    CUDA); its training flag is restored afterwards. Returns CPU tensors: features
    float32 ``[N, D]`` and labels int64 ``[N]``.
    """
    if level not in LEVEL_NAMES:
        raise ValueError(f"level must be one of 1..4 (C2..C5); got {level}")
    device = torch.device(device)
    param = next(backbone.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(
            f"the backbone is on {param.device} but features are requested on {device}; "
            f"move it first with backbone.to({str(device)!r})"
        )
    total = _num_images(loader)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    seen = 0
    start = last_log = time.perf_counter()
    was_training = backbone.training
    backbone.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            for images, targets in loader:
                levels = backbone(images.to(device, non_blocking=True))
                if not isinstance(levels, (list, tuple)) or len(levels) != len(LEVEL_NAMES):
                    raise ValueError(
                        "backbone(x) must return the list [C2, C3, C4, C5] "
                        "(docs/architecture.md, Backbones)"
                    )
                features.append(levels[level - 1].float().mean(dim=(2, 3)).cpu())
                labels.append(_labels_of(targets))
                seen += len(images)
                now = time.perf_counter()
                if now - last_log >= PROGRESS_EVERY_S:
                    last_log = now
                    rate = seen / (now - start)
                    eta = f", ETA {(total - seen) / rate:.0f} s" if total else ""
                    logger.info(
                        "features %s: %d/%s images (%.1f img/s%s)",
                        LEVEL_NAMES[level],
                        seen,
                        total or "?",
                        rate,
                        eta,
                    )
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches: the downstream split is empty")
    elapsed = time.perf_counter() - start
    logger.info(
        "features %s: %d images in %.1f s (%.1f img/s)",
        LEVEL_NAMES[level],
        seen,
        elapsed,
        seen / max(elapsed, 1e-9),
    )
    return torch.cat(features), torch.cat(labels)


# --------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------


class UnseenClassesError(ValueError):
    """Val labels that never occur in the train labels: the probe cannot predict them."""

    def __init__(self, classes: list[int]):
        self.classes = classes
        super().__init__(
            f"val classes {classes} have no train examples, so a linear probe cannot learn "
            "them; give every val class train examples (a larger split or fewer classes)"
        )


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # val accuracy, percent
    l2: float  # the chosen L2 strength
    sweep: dict[float, float]  # L2 -> accuracy (percent) on the held-out selection split
    num_train: int
    num_val: int
    iterations: int  # L-BFGS iterations, all fits together
    seconds: float


def _check_split(name: str, x: Tensor, y: Tensor, num_classes: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be a [N, D] feature matrix; got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}_x must be floating point; got {x.dtype}")
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name}_y must be an integer vector [N]; got {y.dtype} {list(y.shape)}")
    if len(x) != len(y):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{name} split is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or inf (a diverged backbone?)")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name}_y must lie in [0, {num_classes}); got labels in [{low}, {high}]")


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, held_out)``: ``round(fraction * n_c)`` of each class held out.

    Deterministic in ``seed``; a class keeps at least one fit example.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, held_out = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = min(round(fraction * len(idx)), len(idx) - 1)
        held_out.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held_out).sort().values


def _fit_softmax_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int,
    init: tuple[Tensor, Tensor] | None = None,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor, int]:
    """Minimise ``mean CE(x @ W.T + b, y) + l2 / 2 * ||W||^2`` (bias not penalised).

    ``W`` is one ``[C, D]`` matrix (``nn.Linear`` layout: both the forward ``x @ W.T``
    and the gradient ``G.T @ x`` then read ``x`` row-major, ~3x faster on CPU than
    ``[D, C]``).

    The objective is scikit-learn's ``LogisticRegression`` one with ``C = 1 / (l2 * n)``.
    Stops like its lbfgs: max |gradient| <= 1e-4, or ``max_iter`` iterations. Returns
    ``(W, b, iterations)``.
    """
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, dtype=x.dtype)
    bias = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    if init is not None:
        weight.copy_(init[0])
        bias.copy_(init[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-9,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach(), optimizer.state[weight]["n_iter"]


def _accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> float:
    return 100.0 * (F.linear(x, weight, bias).argmax(dim=1) == y).float().mean().item()


def _standardise(train_x: Tensor, val_x: Tensor) -> tuple[Tensor, Tensor]:
    """Zero mean, unit variance per feature, with the train statistics."""
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, correction=0)
    std = torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std))
    return (train_x - mean) / std, (val_x - mean) / std


def _check_probe_inputs(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int,
    selection_fraction: float,
) -> list[float]:
    """Raise a clear error for unusable probe inputs; return the L2 grid, largest first."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
        raise ValueError(f"l2_grid must be a non-empty list of positive numbers; got {l2_grid}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter}")
    if not 0.0 < selection_fraction < 1.0:
        raise ValueError(f"selection_fraction must lie in (0, 1); got {selection_fraction}")
    _check_split("train", train_x, train_y, num_classes)
    _check_split("val", val_x, val_y, num_classes)
    if train_x.shape[1] != val_x.shape[1]:
        raise ValueError(
            f"train features have {train_x.shape[1]} dims but val features have "
            f"{val_x.shape[1]}: extract both with the same backbone and level"
        )
    unseen = sorted(set(val_y.unique().tolist()) - set(train_y.unique().tolist()))
    if unseen:
        raise UnseenClassesError(unseen)
    return grid


def _select_l2(
    x: Tensor,
    y: Tensor,
    grid: list[float],
    num_classes: int,
    max_iter: int,
    selection_fraction: float,
    seed: int,
) -> tuple[float, dict[float, float], tuple[Tensor, Tensor], int]:
    """Fit each L2 (largest first, warm-started) on part of the train set, score on the rest.

    Returns the chosen L2 (best held-out accuracy, ties: the larger), the accuracies, the
    chosen L2's solution (to warm-start the refit) and the iterations spent.
    """
    fit_idx, held_idx = stratified_split(y, selection_fraction, seed)
    if len(held_idx) == 0:
        raise ValueError(
            f"{len(y)} train examples leave none for selecting the L2 strength "
            f"(selection_fraction={selection_fraction}); pass a single-value l2_grid"
        )
    fit_idx, held_idx = fit_idx.to(x.device), held_idx.to(x.device)
    fit_x, fit_y, held_x, held_y = x[fit_idx], y[fit_idx], x[held_idx], y[held_idx]
    sweep: dict[float, float] = {}
    solutions: dict[float, tuple[Tensor, Tensor]] = {}
    iterations = 0
    init = None
    for l2 in grid:
        weight, bias, n_iter = _fit_softmax_regression(
            fit_x, fit_y, num_classes, l2, max_iter, init
        )
        init = solutions[l2] = (weight, bias)
        sweep[l2] = _accuracy(held_x, held_y, weight, bias)
        iterations += n_iter
    chosen = max(grid, key=lambda v: (sweep[v], v))
    return chosen, dict(sorted(sweep.items())), solutions[chosen], iterations


def fit_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    max_iter: int = 200,
    selection_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Linear-probe top-1 of frozen features on a downstream classification set.

    Features are standardised with the train mean/std. With more than one L2 value, each
    is fitted on ``1 - selection_fraction`` of the train set (stratified, by ``seed``)
    and scored on the rest; the best (ties: the larger L2) is refitted on the whole train
    set and scored on val. The sweep runs from the largest L2 down, each fit warm-started
    from the previous one, and the refit starts from the chosen L2's sweep solution.
    """
    start = time.perf_counter()
    grid = _check_probe_inputs(
        train_x, train_y, val_x, val_y, num_classes, l2_grid, max_iter, selection_fraction
    )
    device = torch.device(device) if device is not None else train_x.device
    train_x = train_x.to(device, torch.float32)
    val_x = val_x.to(device, torch.float32)
    train_y = train_y.to(device, torch.int64)
    val_y = val_y.to(device, torch.int64)
    train_x, val_x = _standardise(train_x, val_x)
    if len(grid) > 1:
        chosen, sweep, init, iterations = _select_l2(
            train_x, train_y, grid, num_classes, max_iter, selection_fraction, seed
        )
    else:
        chosen, sweep, init, iterations = grid[0], {}, None, 0
    weight, bias, refit_iterations = _fit_softmax_regression(
        train_x, train_y, num_classes, chosen, max_iter, init
    )
    result = ProbeResult(
        top1=_accuracy(val_x, val_y, weight, bias),
        l2=chosen,
        sweep=sweep,
        num_train=len(train_y),
        num_val=len(val_y),
        iterations=iterations + refit_iterations,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "linear probe: top1 %.2f with l2=%g (selection sweep %s), %d train / %d val, %.2f s",
        result.top1,
        result.l2,
        {f"{k:g}": round(v, 2) for k, v in result.sweep.items()},
        result.num_train,
        result.num_val,
        result.seconds,
    )
    return result


# --------------------------------------------------------------------------------------
# On a downstream source
# --------------------------------------------------------------------------------------

FEATURE_BATCH = 128


def probe_top1(
    backbone: nn.Module,
    manifest_uri: str,
    name: str,
    cfg: PipelineConfig,
    device: torch.device | str,
) -> float:
    """Linear-probe top-1 (percent) of ``backbone`` on the downstream source ``name``, on the
    pooled features of ``transfer.probe_level`` (C5 by default)."""
    loaders = []
    for split in ("train", "val"):
        ds = ShardDataset(manifest_uri, split, cfg.model.image_size)
        loaders.append(
            torch.utils.data.DataLoader(ds, batch_size=FEATURE_BATCH, collate_fn=collate_fn("cls"))
        )
        num_classes = ds.num_classes
    level = LEVEL_OF_NAME[cfg.transfer.probe_level]
    train_x, train_y = extract_features(backbone, loaders[0], device, level)
    val_x, val_y = extract_features(backbone, loaders[1], device, level)
    try:
        result = fit_linear_probe(
            train_x,
            train_y,
            val_x,
            val_y,
            num_classes=num_classes,
            l2_grid=cfg.transfer.probe_l2,
            max_iter=cfg.transfer.probe_max_iter,
            seed=cfg.seed,
            device=device,
        )
    except UnseenClassesError as err:
        raise ValueError(f"downstream source {name!r} ({manifest_uri}): {err}") from None
    return result.top1
