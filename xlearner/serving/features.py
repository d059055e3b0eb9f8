"""What the served backbone computes and how MLflow describes it: pooled C5 features of
images, the model's signature and input example (:mod:`xlearner.serving.backbone_model`
is the model's code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MODEL_CODE = Path(__file__).with_name("backbone_model.py")


def pooled_features(backbone: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """``[N, 3, S, S]`` float32 images in [0, 1] -> the backbone's C5 map averaged, ``[N, C5]``."""
    with torch.inference_mode():
        return backbone(torch.as_tensor(images, dtype=torch.float32))[-1].mean(dim=(2, 3)).numpy()


def input_example(image_size: int) -> np.ndarray:
    """One image of the training size, for the model's signature and its page in MLflow."""
    return np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)


def model_signature(backbone_dir: str | Path, example: np.ndarray):
    """Any number of ``3 x H x W`` float32 images in, ``[N, C5]`` float32 out (the width
    from running the backbone on ``example``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from xlearner.models.loading import load_backbone

    features = pooled_features(load_backbone(backbone_dir).eval(), example)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, features.shape[1]))]),
    )
