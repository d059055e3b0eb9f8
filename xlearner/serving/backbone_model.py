"""MLflow "model from code": the backbone as a pyfunc model.

MLflow logs this file as the model's code (no pickled Python object) and the ``xlearner``
package beside it (``code_paths``); the weights travel as the ``backbone`` artifact
(safetensors + JSON) and load with ``load_backbone``. ``predict`` takes images
``[N, 3, S, S]`` (float32 in [0, 1]) and returns pooled C5 features ``[N, C5]``.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class BackboneModel(PythonModel):
    def load_context(self, context) -> None:
        from xlearner.models.loading import load_backbone

        self.backbone = load_backbone(context.artifacts["backbone"]).eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from xlearner.serving.features import pooled_features

        return pooled_features(self.backbone, np.asarray(model_input, dtype=np.float32))


mlflow.models.set_model(BackboneModel())
