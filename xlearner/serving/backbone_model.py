"""MLflow "model from code": the backbone as a pyfunc model.

MLflow logs this file as the model's code (no pickled Python object); the weights travel
as the ``backbone`` artifact (safetensors + JSON) and load with ``load_backbone``.
``predict`` takes images ``[N, 3, S, S]`` in [0, 1] and returns pooled C5 features.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class BackboneModel(PythonModel):
    def load_context(self, context) -> None:
        from xlearner.models.loading import load_backbone

        self.backbone = load_backbone(context.artifacts["backbone"]).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.backbone(images)[-1].mean(dim=(2, 3)).numpy()


mlflow.models.set_model(BackboneModel())
