"""What reconciliation costs: gamma parameters and FLOPs against the sub-backbones'.

:func:`gamma_cost` (or :func:`estimate_gamma_cost`, before the gammas are built) counts
them; :func:`check_gamma_budget` enforces ``reconcile.max_gamma_ratio`` and names the
layouts that would fit. FLOPs are conv multiply-accumulates per image, counted by a
forward-hook pass on the meta device, so nothing is computed or allocated.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from xlearner.models.backbone import count_parameters
from xlearner.models.reconciliation import (
    DEFAULT_RECEIVE_STAGES,
    GAMMA_KINDS,
    NUM_STAGES,
    GammaKind,
    Mode,
    ReconciledNetwork,
    gamma_topology,
    make_gamma,
)


class GammaBudget(Protocol):
    """What the cap reads of the config's ``reconcile`` section."""

    max_gamma_ratio: float | None


class GammaBudgetError(ValueError):
    """The gammas cost more than ``reconcile.max_gamma_ratio`` allows (a config error)."""


def conv_macs(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, list[torch.Size]]:
    """Multiply-accumulates of the convs and linears in one forward of ``module`` on an
    input of ``input_shape``, and the shapes of its outputs.

    A forward-hook pass on the meta device: every parameter and buffer is replaced by a
    meta tensor of the same shape, so nothing is computed or allocated whatever the size.
    A conv counts ``C_out * C_in / groups * k_h * k_w * H_out * W_out``; BN, ReLU, pooling
    and additions are not counted (the usual convention: ResNet-50 = 4.1 G at 224x224).
    """
    total = 0

    def hook(layer: nn.Module, _inputs: Any, output: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            per_position = layer.out_channels * (layer.in_channels // layer.groups) * kh * kw
            total += per_position * output.shape[0] * output.shape[2] * output.shape[3]
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features * output[..., 0].numel()

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    meta = {
        name: torch.empty_like(t, device="meta")
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
    }
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = functional_call(
                module, meta, (torch.empty(*input_shape, device="meta"),), strict=False
            )
    finally:
        for m, training in modes:  # each module's own mode (a frozen BN stays in eval)
            m.training = training
        for handle in handles:
            handle.remove()
    outputs = out if isinstance(out, list | tuple) else [out]
    return total, [o.shape for o in outputs]


@dataclass(frozen=True)
class BackboneProfile:
    """What the gamma cost needs of one sub-backbone at one image size."""

    channels: tuple[int, ...]  # C2..C5
    sizes: tuple[tuple[int, int], ...]  # (H, W) of C2..C5
    params: int
    flops: int  # conv multiply-accumulates per image


def profile_backbone(backbone: nn.Module, image_size: int) -> BackboneProfile:
    flops, shapes = conv_macs(backbone, (1, 3, image_size, image_size))
    if len(shapes) != NUM_STAGES:
        raise ValueError(f"a sub-backbone returns {NUM_STAGES} features, got {len(shapes)}")
    return BackboneProfile(
        channels=tuple(int(s[1]) for s in shapes),
        sizes=tuple((int(s[2]), int(s[3])) for s in shapes),
        params=count_parameters(backbone),
        flops=flops,
    )


@dataclass(frozen=True)
class GammaCost:
    """Gamma parameters and FLOPs (conv multiply-accumulates per image at ``image_size``)
    of one reconciliation layout, against its sub-backbones'.

    ``ratio`` = the larger of ``param_ratio`` and ``flop_ratio``: what
    ``reconcile.max_gamma_ratio`` caps. :meth:`with_options` prices another layout over
    the same sub-backbones without building it.
    """

    gamma: GammaKind
    mode: Mode
    receive_stages: tuple[int, ...]
    image_size: int
    num_gammas: int
    gamma_params: int
    gamma_flops: int
    backbone_params: int
    backbone_flops: int
    profiles: Mapping[str, BackboneProfile] = dataclasses.field(repr=False)

    @property
    def tasks(self) -> list[str]:
        return list(self.profiles)

    @property
    def param_ratio(self) -> float:
        return self.gamma_params / self.backbone_params

    @property
    def flop_ratio(self) -> float:
        return self.gamma_flops / self.backbone_flops

    @property
    def ratio(self) -> float:
        return max(self.param_ratio, self.flop_ratio)

    def with_options(
        self,
        *,
        gamma: GammaKind | None = None,
        mode: Mode | None = None,
        receive_stages: Sequence[int] | None = None,
    ) -> GammaCost:
        return _price(
            self.profiles,
            self.image_size,
            gamma=gamma or self.gamma,
            mode=mode or self.mode,
            receive_stages=self.receive_stages if receive_stages is None else receive_stages,
        )

    def options(self) -> str:
        return f"gamma={self.gamma}, mode={self.mode}, receive_stages={list(self.receive_stages)}"

    def metrics(self) -> dict[str, float]:
        """For MLflow (``tracker.log_metrics``)."""
        return {
            "gamma_parameters": float(self.gamma_params),
            "gamma_flops": float(self.gamma_flops),
            "backbone_parameters": float(self.backbone_params),
            "backbone_flops": float(self.backbone_flops),
            "gamma_param_ratio": self.param_ratio,
            "gamma_flop_ratio": self.flop_ratio,
        }

    def summary(self) -> str:
        """One line to print before training."""
        size = f"{self.image_size}x{self.image_size}"
        return (
            f"reconciliation ({self.options()}, {len(self.profiles)} tasks): "
            f"{self.num_gammas} gammas, {self.gamma_params:,} parameters and "
            f"{_giga(self.gamma_flops)} FLOPs per {size} image, against the sub-backbones' "
            f"{self.backbone_params:,} parameters and {_giga(self.backbone_flops)} FLOPs "
            f"(ratio: parameters {self.param_ratio:.2f}, FLOPs {self.flop_ratio:.2f})"
        )


def _giga(flops: int) -> str:
    return f"{flops / 1e9:.3g} G"


def _gamma_cost(
    in_channels: int, out_channels: int, steps: int, kind: GammaKind, size: tuple[int, int]
) -> tuple[int, int]:
    """(parameters, conv MACs) of one gamma on a [1, in_channels, *size] input."""
    with torch.device("meta"):
        gamma = make_gamma(in_channels, out_channels, steps, kind)
    flops, _ = conv_macs(gamma, (1, in_channels, *size))
    return count_parameters(gamma), flops


def _price(
    profiles: Mapping[str, BackboneProfile],
    image_size: int,
    *,
    gamma: GammaKind,
    mode: Mode,
    receive_stages: Sequence[int],
) -> GammaCost:
    if gamma not in GAMMA_KINDS:
        raise ValueError(f"gamma must be one of {GAMMA_KINDS}, got {gamma!r}")
    edges = gamma_topology(list(profiles), mode, receive_stages)
    params = flops = 0
    cache: dict[tuple, tuple[int, int]] = {}
    for target, source, from_stage, to_stage in edges:
        shape = (
            profiles[source].channels[from_stage - 1],
            profiles[target].channels[to_stage - 1],
            to_stage - from_stage,
            gamma,
            profiles[source].sizes[from_stage - 1],
        )
        if shape not in cache:
            cache[shape] = _gamma_cost(*shape)
        params += cache[shape][0]
        flops += cache[shape][1]
    return GammaCost(
        gamma=gamma,
        mode=mode,
        receive_stages=tuple(sorted(set(receive_stages))),
        image_size=image_size,
        num_gammas=len(edges),
        gamma_params=params,
        gamma_flops=flops,
        backbone_params=sum(p.params for p in profiles.values()),
        backbone_flops=sum(p.flops for p in profiles.values()),
        profiles=dict(profiles),
    )


def estimate_gamma_cost(
    sub_backbones: Mapping[str, nn.Module],
    image_size: int,
    *,
    gamma: GammaKind = "conv",
    mode: Mode = "full",
    receive_stages: Sequence[int] = DEFAULT_RECEIVE_STAGES,
) -> GammaCost:
    """The cost of the gammas a :class:`ReconciledNetwork` over ``sub_backbones`` would
    have, without building them (so a too-large layout fails before it is allocated)."""
    if not sub_backbones:
        raise ValueError("at least one sub-backbone is needed")
    profiles: dict[str, BackboneProfile] = {}
    for task, backbone in sub_backbones.items():
        profiles[task] = profile_backbone(backbone, image_size)
    return _price(profiles, image_size, gamma=gamma, mode=mode, receive_stages=receive_stages)


def gamma_cost(network: ReconciledNetwork, image_size: int) -> GammaCost:
    """The cost of ``network``'s gammas per image at ``image_size`` (``model.image_size``)."""
    return estimate_gamma_cost(
        dict(network.sub_backbones),
        image_size,
        gamma=network.gamma,
        mode=network.mode,
        receive_stages=network.receive_stages,
    )


def _alternatives(cost: GammaCost) -> list[GammaCost]:
    """Cheaper layouts: lighter gammas, fewer receiving stages (the highest dropped
    first), same-level only, and their combinations; each distinct cost once, with the
    fewest changes. ``mode=none`` is not offered (it is the no-reconciliation ablation)."""
    stage_sets = [cost.receive_stages[:n] for n in range(len(cost.receive_stages) - 1, 0, -1)]
    kinds = [cost.gamma] + [k for k in GAMMA_KINDS if k != cost.gamma]
    candidates: list[dict[str, Any]] = [{"gamma": k} for k in kinds[1:]]
    candidates += [{"gamma": k, "receive_stages": s} for k in kinds for s in stage_sets]
    if cost.mode == "full":
        candidates += [{"gamma": k, "mode": "same_level"} for k in kinds]
    candidates.sort(key=lambda options: sum(1 for k, v in options.items() if v != getattr(cost, k)))
    seen = {(cost.num_gammas, cost.gamma_params, cost.gamma_flops)}
    priced = []
    for options in candidates:
        alternative = cost.with_options(**options)
        key = (alternative.num_gammas, alternative.gamma_params, alternative.gamma_flops)
        if key not in seen and alternative.num_gammas:
            seen.add(key)
            priced.append(alternative)
    return priced


def _changes(cost: GammaCost, alternative: GammaCost) -> list[str]:
    changes = []
    if alternative.gamma != cost.gamma:
        changes.append(f"reconcile.gamma={alternative.gamma}")
    if alternative.receive_stages != cost.receive_stages:
        changes.append(f"reconcile.receive_stages={list(alternative.receive_stages)}")
    if alternative.mode != cost.mode:
        changes.append(f"reconcile.mode={alternative.mode}")
    return changes


def check_gamma_budget(cost: GammaCost, cfg: GammaBudget, max_options: int = 4) -> None:
    """Raise :class:`GammaBudgetError` when ``cost.ratio`` exceeds ``cfg.max_gamma_ratio``
    (``None`` = no cap), with the numbers and up to ``max_options`` cheaper layouts that
    fit: those that keep the mode first (same_level gives up the lower levels, METHOD.md
    Observation 4), then the one that keeps the most reconciliation (the highest ratio)."""
    cap = cfg.max_gamma_ratio
    if cap is None or cost.ratio <= cap:
        return
    fitting = sorted(
        (a for a in _alternatives(cost) if a.ratio <= cap),
        key=lambda a: (a.mode != cost.mode, -a.ratio),
    )[:max_options]
    if fitting:
        listed = "; ".join(
            f"{' + '.join(_changes(cost, a))} (ratio {a.ratio:.2f}: "
            f"{a.gamma_params:,} parameters, {_giga(a.gamma_flops)} FLOPs)"
            for a in fitting
        )
        advice = f"options that fit: {listed}"
    else:
        advice = "no lighter layout fits (reconcile.mode=none drops reconciliation altogether)"
    raise GammaBudgetError(
        f"reconcile.max_gamma_ratio={cap}: {cost.summary()} exceeds the cap "
        f"(the larger ratio counts); {advice}; or raise reconcile.max_gamma_ratio to "
        f"{cost.ratio:.2f}"
    )
