"""X-Learner_p: prune the expanded network down to the size of one backbone.

Structured channel pruning with Torch-Pruning's DepGraph, which keeps coupled channels
consistent: the residual adds inside every sub-backbone and the sums
F_i^t = E_i^t + sum gamma(E_j^k) that tie gamma outputs to stage outputs. Choices:

- What is pruned: the whole trunk (every sub-backbone and gamma) wrapped as one
  backbone (:class:`PrunedReconciledBackbone`, levels = concatenation over tasks); the
  heads are not part of it. Images keep their 3 input channels.
- Importance: L2 magnitude of each coupled channel group; the same ratio in every
  layer (local pruning), so no sub-backbone or gamma can vanish.
- Ratio: the parameter count of a uniformly pruned ResNet falls about as
  ``(1 - ratio) ** a`` with a ~ 2; ``a`` is fitted from each attempt until the count
  is within ``PARAMETER_TOLERANCE`` of the target (a few attempts at most).
- Fine-tune: ``cfg.train.steps`` of FitNet distillation against the unpruned teacher's
  features (the :class:`DistillationObjective` with the pruned network as student).

Pruning is deterministic (magnitude-based), so a resumed run rebuilds the same pruned
architecture before the engine restores its fine-tuning checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch
import torch_pruning as tp

from xlearner.checkpoint import Checkpointer
from xlearner.config import EngineConfig, SqueezeConfig
from xlearner.engine import MetricsCallback
from xlearner.loaders import Stream
from xlearner.models.backbone import count_parameters
from xlearner.models.multitask import MultiTaskModel
from xlearner.models.pruned import PrunedReconciledBackbone
from xlearner.models.reconciliation import ReconciledNetwork
from xlearner.squeeze.distill import DistillationObjective, train_objective

log = logging.getLogger("xlearner.squeeze")

PARAMETER_TOLERANCE = 0.10  # accepted |pruned / target - 1|
AIM_TOLERANCE = 0.03  # stop refining the ratio once this close
MAX_ATTEMPTS = 4
TRACE_SIZE = 64  # DepGraph traces shapes only: a small input is enough


def count_flops(module: torch.nn.Module, image_size: int) -> int:
    """Multiply-accumulate operations of one forward at ``image_size`` (torch_pruning's count)."""
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            example = torch.zeros(
                1, 3, image_size, image_size, device=param.device, dtype=param.dtype
            )
            ops, _ = tp.utils.count_ops_and_params(module, example)
    finally:
        module.train(was_training)
    return int(ops)


def prune_once(backbone: PrunedReconciledBackbone, ratio: float) -> PrunedReconciledBackbone:
    """A copy of ``backbone`` with ``ratio`` of the channels of every coupled group removed."""
    pruned = copy.deepcopy(backbone).eval()
    trunk: ReconciledNetwork = pruned.trunk
    detach = trunk.detach_other_tasks
    # DepGraph follows autograd: a detached input would hide the coupling of a gamma's
    # input channels to the other task's stage output.
    trunk.detach_other_tasks = False
    try:
        example = torch.zeros(1, 3, TRACE_SIZE, TRACE_SIZE, device=next(pruned.parameters()).device)
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=False,
        )
        pruner.step()
    finally:
        trunk.detach_other_tasks = detach
    pruned.channels = pruned.measure_channels()
    return pruned


def prune_to_size(
    backbone: PrunedReconciledBackbone, target_params: int
) -> tuple[PrunedReconciledBackbone, float]:
    """Prune uniformly until the parameter count is about ``target_params``; returns the
    pruned copy and the channel ratio used."""
    total = count_parameters(backbone)
    if target_params >= total:
        raise ValueError(
            f"pruning target {target_params:,} params is not smaller than the expanded trunk "
            f"({total:,} params); nothing to prune"
        )
    exponent = 2.0
    best: tuple[float, PrunedReconciledBackbone, float] | None = None
    for attempt in range(1, MAX_ATTEMPTS + 1):
        ratio = min(0.99, 1 - (target_params / total) ** (1 / exponent))
        pruned = prune_once(backbone, ratio)
        count = count_parameters(pruned)
        error = abs(count / target_params - 1)
        log.info(
            f"prune attempt {attempt}: channel ratio {ratio:.4f} -> {count:,} params "
            f"(target {target_params:,})"
        )
        if best is None or error < best[0]:
            best = (error, pruned, ratio)
        if error <= AIM_TOLERANCE:
            break
        exponent = math.log(count / total) / math.log(1 - ratio)
    error, pruned, ratio = best
    if error > PARAMETER_TOLERANCE:
        raise RuntimeError(
            f"could not prune the expanded trunk ({total:,} params) to within "
            f"{PARAMETER_TOLERANCE:.0%} of {target_params:,} params: the closest was "
            f"{count_parameters(pruned):,} at channel ratio {ratio:.4f}"
        )
    return pruned, ratio


def prune(
    teacher: MultiTaskModel,
    target_params: int,
    streams: list[Stream],
    cfg: SqueezeConfig,
    engine_cfg: EngineConfig,
    seed: int = 0,
    *,
    checkpointer: Checkpointer | None = None,
    on_metrics: MetricsCallback | None = None,
    name: str = "squeeze-prune",
) -> tuple[PrunedReconciledBackbone, dict[str, Any]]:
    """Prune ``teacher``'s expanded trunk to about ``target_params`` parameters, fine-tune
    it against the unpruned teacher, and return it (on CPU) with a report."""
    if not isinstance(teacher.trunk, ReconciledNetwork):
        raise ValueError(
            f"pruning needs the expanded model (a reconciled trunk); this teacher's trunk is "
            f"{teacher.spec['trunk'].get('kind')!r}: use squeeze.method=distill"
        )
    teacher.eval()
    image_size = int(teacher.spec["image_size"])
    started = time.perf_counter()
    unpruned = PrunedReconciledBackbone(copy.deepcopy(teacher.trunk), teacher.spec["trunk"])
    params_before, flops_before = count_parameters(unpruned), count_flops(unpruned, image_size)
    pruned, ratio = prune_to_size(unpruned, target_params)
    del unpruned
    params_after, flops_after = count_parameters(pruned), count_flops(pruned, image_size)
    log.info(
        f"[{name}] pruned {params_before:,} -> {params_after:,} params, "
        f"{flops_before / 1e6:.1f} -> {flops_after / 1e6:.1f} MFLOPs at {image_size}px "
        f"in {time.perf_counter() - started:.1f}s"
    )
    torch.manual_seed(seed)
    objective = DistillationObjective(
        teacher, pruned, cfg.levels, cfg.task_loss_weight, target_weights=cfg.target_weights
    )
    report = train_objective(
        objective, streams, cfg, engine_cfg, seed, name, checkpointer, on_metrics
    )
    report |= {
        "method": "prune",
        "channel_ratio": ratio,
        "target_parameters": target_params,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "image_size": image_size,
        "channels": list(pruned.channels),
    }
    return pruned.cpu().eval(), report
