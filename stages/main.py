"""What every stage shares: the one ``main`` around a stage's body.

:func:`stage_main` parses the stage's typed call (:mod:`xlearner.contract`), loads the
config by URI, skips a stage whose output already holds ``result.json``, joins the DDP
group under torchrun, runs the body, maps errors to an :class:`~xlearner.contract.ExitCode`
and prints ``XLEARNER_RESULT {json}`` for the runner. The body gets the call, the config
and the output folder, and returns the :class:`~xlearner.contract.StageResult`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

from xlearner import distributed
from xlearner.config import ConfigError, PipelineConfig, load_config
from xlearner.contract import RESULT_FILE, RESULT_PREFIX, ExitCode, StageCall, StageResult
from xlearner.outputs import StageOutput
from xlearner.store import StoreError

log = logging.getLogger("xlearner.stage")

C = TypeVar("C", bound=StageCall)
Body = Callable[[C, PipelineConfig, StageOutput | None], StageResult]
BAD_INPUT = (ConfigError, StoreError, ValueError, FileNotFoundError)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes, not the one of the moment
    it was made: a stage run in-process (tests, with captured and later closed streams)
    must not leave the root logger writing to a closed file."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_StdoutHandler()],
        force=True,
    )


def emit_result(result: StageResult) -> None:
    print(RESULT_PREFIX + json.dumps(result.dump(), sort_keys=True), flush=True)


def _run(call_class: type[C], body: Body, argv: list[str] | None, skip_done: bool) -> StageResult:
    call = call_class.parse(argv)
    distributed.init_from_env()  # under torchrun: join the process group (no-op otherwise)
    cfg = load_config(call.config, call.overrides)
    call.check()
    out = StageOutput(call.out) if call.out else None
    if skip_done and out is not None and (done := out.done()) is not None:
        log.info(f"stage {call.stage.value}: {out.uri} already has {RESULT_FILE}; nothing to do")
        out.close()
        done.skipped = True
        return done
    try:
        return body(call, cfg, out)
    finally:
        if out is not None:
            out.close()  # the local work folder, also when the body failed


def stage_main(
    call_class: type[C], body: Body, argv: list[str] | None = None, *, skip_done: bool = True
) -> int:
    """Run one stage: ``body(call, cfg, out)`` with the call parsed from ``argv``.

    ``skip_done``: return the published result (``"skipped": true``) without running the
    body when ``--out`` already holds ``result.json``. A malformed command line exits 2
    (argparse's own exit for an unknown flag); the exit code is an ``ExitCode``.
    """
    stage = call_class.stage.value
    setup_logging()
    t0 = time.perf_counter()
    try:
        result = _run(call_class, body, argv, skip_done)
    except BAD_INPUT as err:
        log.error(f"stage {stage} failed: {err}")
        return int(ExitCode.BAD_INPUT)
    except Exception:  # noqa: BLE001 - a stage reports every failure on its way out
        log.error(f"stage {stage} failed:\n{traceback.format_exc()}")
        return int(ExitCode.FAILED)
    finally:
        distributed.cleanup()
    result.stage = result.stage or stage
    result.seconds = round(time.perf_counter() - t0, 3)
    if distributed.is_main_process():
        emit_result(result)
    return int(ExitCode.OK)
