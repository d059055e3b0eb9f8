"""A stage that also records the weights each rank ends with (for the DDP tests).

``python -m tests.model.ddp_stage_probe <stage> <stage args...>`` (under torchrun) runs
``stages.<stage>`` unchanged, except that just before publishing every rank writes the
state dict of its trained model to ``$XLEARNER_TEST_WEIGHTS_DIR/rank<RANK>.safetensors``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

WEIGHTS_DIR_ENV = "XLEARNER_TEST_WEIGHTS_DIR"


def main() -> int:
    stage = importlib.import_module(f"stages.{sys.argv[1]}")
    publish = stage.publish_trained

    def recording_publish(out, cfg, trained):
        model = trained.model if trained.model is not None else trained.backbone
        path = Path(os.environ[WEIGHTS_DIR_ENV], f"rank{os.environ.get('RANK', '0')}.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
        return publish(out, cfg, trained)

    stage.publish_trained = recording_publish
    return stage.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
