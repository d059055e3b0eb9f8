"""The expanded network: one sub-backbone per task joined by reconciliation layers.

With stages i = 1..4 (C2..C5) and tasks t, k (METHOD.md, X-Learner expansion):

    F_i^t = E_i^t + sum_k sum_{j <= i} gamma_{j->i}^{k->t}(E_j^k)

computed stage by stage: E_1^t = stage_1^t(stem^t(x)) and E_i^t = stage_i^t(F_{i-1}^t),
so reconciled features flow upward through each task's own stages.

- gamma, two kinds (``gamma``):
  - ``conv`` (HRNet-style, as OpenGVLab gv-benchmark's ``Cross_Conv_HRNet_Layer``): for
    j == i a 1x1 conv + BN; for j < i, (i-j-1) blocks [3x3 stride-2 conv, BN, ReLU] at
    C_j^k channels, then a 3x3 stride-2 conv to C_i^t + BN.
  - ``light``: for j == i the same 1x1 conv + BN; for j < i an average pool to the
    target stride (kernel = stride = 2^(i-j), ceil mode: the sizes of the backbone's
    own stride-2 convs), then a 1x1 conv to C_i^t + BN: a 1x1 kernel and no chain, at
    the cost of a fixed (not learnt) down-sampling. ResNet-50 x 4 tasks into stages 1-3:
    31 M gamma parameters instead of 158 M, 11.5 G FLOPs instead of 51.8 G at 224x224.
- Only the last BN of each gamma starts at zero (weight and bias): the expanded model
  starts exactly as the trained sub-backbones, and every gamma still gets a gradient
  (a zeroed middle BN would block it).
- The term k == t, j == i is skipped: gamma(E_i^t) added to E_i^t is only a
  reparametrisation of task t's own stage. The k == t, j < i terms (a task's own
  lower levels, skipping stages) are kept.
- ``detach_other_tasks``: E_j^k (k != t) enters task t's gammas detached, so task t's
  loss trains its own sub-backbone and gammas but not other tasks' sub-backbones.
- ``receive_stages``: the stages i that get gammas. Default 1-3, as gv-benchmark: with
  ResNet-50 sub-backbones the gammas into stage 4 (C5, 2048 channels) are 80% of the
  ``conv`` gamma parameters (636 M of 794 M for four tasks, beside 94 M of sub-backbones).
- ``mode``: ``full`` (all j <= i), ``same_level`` (j == i only, an ablation), ``none``
  (no gammas: F = E, the "w/o reconciliation" variant).

Gamma keys in :attr:`ReconciledNetwork.gammas` read ``"<t><-<k>:<j>-><i>"``, e.g.
``"cls<-det:2->3"`` = gamma from det's stage 2 into cls's stage 3.

What the gammas cost against the sub-backbones, and the ``reconcile.max_gamma_ratio``
cap: :mod:`xlearner.models.gamma_cost`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from torch import Tensor, nn

from xlearner.models.backbone import Backbone, count_parameters

Mode = Literal["full", "same_level", "none"]
MODES = ("full", "same_level", "none")
GammaKind = Literal["conv", "light"]
GAMMA_KINDS = ("conv", "light")
NUM_STAGES = 4
DEFAULT_RECEIVE_STAGES = (1, 2, 3)


def gamma_key(target: str, source: str, from_stage: int, to_stage: int) -> str:
    return f"{target}<-{source}:{from_stage}->{to_stage}"


def make_gamma(
    in_channels: int, out_channels: int, steps: int, kind: GammaKind = "conv"
) -> nn.Sequential:
    """Map a stage-j feature onto stage i = j + ``steps`` (channels and stride)."""
    if kind not in GAMMA_KINDS:
        raise ValueError(f"gamma kind must be one of {GAMMA_KINDS}, got {kind!r}")
    if steps == 0:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False)]
    elif kind == "light":
        factor = 2**steps
        layers = [
            nn.AvgPool2d(factor, stride=factor, ceil_mode=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        ]
    else:
        layers = []
        for _ in range(steps - 1):
            layers += [
                nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False))
    last_bn = nn.BatchNorm2d(out_channels)
    nn.init.zeros_(last_bn.weight)
    nn.init.zeros_(last_bn.bias)
    return nn.Sequential(*layers, last_bn)


def gamma_topology(
    tasks: Sequence[str], mode: Mode, receive_stages: Sequence[int]
) -> list[tuple[str, str, int, int]]:
    """(target t, source k, from stage j, to stage i) of every gamma, in build order."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    edges = []
    for target in tasks:
        for to_stage in sorted(set(receive_stages)) if mode != "none" else ():
            from_stages = (
                range(to_stage, to_stage + 1) if mode == "same_level" else range(1, to_stage + 1)
            )
            for source in tasks:
                for from_stage in from_stages:
                    if source == target and from_stage == to_stage:
                        continue
                    edges.append((target, source, from_stage, to_stage))
    return edges


class ReconciledNetwork(nn.Module):
    """``forward(x) -> {task: [F_1, F_2, F_3, F_4]}`` over the given sub-backbones."""

    def __init__(
        self,
        sub_backbones: Mapping[str, Backbone],
        mode: Mode = "full",
        detach_other_tasks: bool = True,
        receive_stages: Sequence[int] = DEFAULT_RECEIVE_STAGES,
        gamma: GammaKind = "conv",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if gamma not in GAMMA_KINDS:
            raise ValueError(f"gamma must be one of {GAMMA_KINDS}, got {gamma!r}")
        if not sub_backbones:
            raise ValueError("at least one sub-backbone is needed")
        bad_stages = [s for s in receive_stages if s not in range(1, NUM_STAGES + 1)]
        if bad_stages:
            raise ValueError(f"receive_stages must be within 1..{NUM_STAGES}, got {bad_stages}")
        bad_names = [t for t in sub_backbones if not t or "." in t or "<-" in t or ":" in t]
        if bad_names:
            raise ValueError(
                f"task names may not be empty or contain '.', '<-' or ':': {bad_names}"
            )
        self.mode = mode
        self.gamma = gamma
        self.detach_other_tasks = detach_other_tasks
        self.receive_stages = tuple(sorted(set(receive_stages)))
        self.sub_backbones = nn.ModuleDict(dict(sub_backbones))
        self.gammas = nn.ModuleDict()
        # (target t, stage i) -> [(gamma key, source k, from stage j)]
        self._inputs: dict[tuple[str, int], list[tuple[str, str, int]]] = {}
        for target, source, from_stage, to_stage in gamma_topology(
            self.tasks, mode, self.receive_stages
        ):
            key = gamma_key(target, source, from_stage, to_stage)
            self.gammas[key] = make_gamma(
                self.channels[source][from_stage - 1],
                self.channels[target][to_stage - 1],
                steps=to_stage - from_stage,
                kind=gamma,
            )
            self._inputs.setdefault((target, to_stage), []).append((key, source, from_stage))

    @property
    def tasks(self) -> list[str]:
        return list(self.sub_backbones)

    @property
    def channels(self) -> dict[str, tuple[int, ...]]:
        return {task: tuple(backbone.channels) for task, backbone in self.sub_backbones.items()}

    def num_gamma_parameters(self) -> int:
        return count_parameters(self.gammas)

    def forward(self, x: Tensor) -> dict[str, list[Tensor]]:
        inputs = {task: backbone.stem(x) for task, backbone in self.sub_backbones.items()}
        stage_outputs: dict[str, list[Tensor]] = {task: [] for task in self.tasks}  # E_j^k
        reconciled: dict[str, list[Tensor]] = {task: [] for task in self.tasks}  # F_i^t
        for index in range(NUM_STAGES):
            for task, backbone in self.sub_backbones.items():
                stage_outputs[task].append(backbone.stages[index](inputs[task]))
            for task in self.tasks:
                feature = stage_outputs[task][index]
                for key, source, from_stage in self._inputs.get((task, index + 1), ()):
                    incoming = stage_outputs[source][from_stage - 1]
                    if self.detach_other_tasks and source != task:
                        incoming = incoming.detach()
                    feature = feature + self.gammas[key](incoming)
                reconciled[task].append(feature)
                inputs[task] = feature
        return reconciled


# --- cost: gamma parameters and FLOPs against the sub-backbones' ---------------------------
