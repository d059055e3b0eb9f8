"""What every stage shares: the one ``main`` around a stage's body.

:func:`stage_main` parses the stage's typed call (:mod:`xlearner.contract`), loads the
config by URI, takes the lease of its output (:mod:`xlearner.lease`: one writer per
output), skips a stage whose output already holds ``result.json``, joins the DDP group
under torchrun, runs the body, maps errors to an :class:`~xlearner.contract.ExitCode`
(:func:`exit_code`) and prints ``XLEARNER_RESULT {json}`` for the runner. SIGTERM and
SIGINT stop it cleanly (:mod:`xlearner.stop`: checkpoint, then exit ``STOPPED``). The
body gets the call, the config and the output folder, and returns the
:class:`~xlearner.contract.StageResult`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from typing import TypeVar

from xlearner import distributed, stop
from xlearner.config import ConfigError, PipelineConfig, load_config
from xlearner.contract import RESULT_FILE, RESULT_PREFIX, ExitCode, StageCall, StageResult
from xlearner.lease import DEFAULT_WAIT_S, LeaseHeld, output_lease
from xlearner.outputs import StageOutput
from xlearner.store import TRANSIENT_S3_CODES, StoreError, StoreUnavailable

log = logging.getLogger("xlearner.stage")

C = TypeVar("C", bound=StageCall)
Body = Callable[[C, PipelineConfig, StageOutput | None], StageResult]
BAD_INPUT = (ConfigError, StoreError, ValueError, FileNotFoundError)
LEASE_WAIT_ENV = "XLEARNER_LEASE_WAIT_S"  # how long a stage waits for its output's writer


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _unreachable(err: BaseException) -> bool:
    """An S3 client error that says "not now": connection, timeout, 5xx, throttling."""
    if "botocore" not in sys.modules:
        return False
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    if isinstance(err, ClientError):
        return err.response.get("Error", {}).get("Code", "") in TRANSIENT_S3_CODES
    return isinstance(err, S3ConnectionError | HTTPClientError)


def exit_code(err: BaseException) -> ExitCode:
    """What a stage's failure means for the flow (see ExitCode); the cause chain counts:
    a store outage stays transient when code above wraps it in another error."""
    for cause in _causes(err):
        if isinstance(cause, stop.StopRequested):
            return ExitCode.STOPPED
        if isinstance(cause, LeaseHeld):
            return ExitCode.BUSY
        if isinstance(cause, StoreUnavailable) or _unreachable(cause):
            return ExitCode.TRANSIENT
    return ExitCode.BAD_INPUT if isinstance(err, BAD_INPUT) else ExitCode.FAILED


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
    lease = (
        output_lease(
            call.out,
            cfg.store.endpoint_url,
            run=call.mlflow_parent_run_id,
            wait_s=float(os.environ.get(LEASE_WAIT_ENV, DEFAULT_WAIT_S)),
        )
        if call.out and distributed.is_main_process()  # rank 0 writes, rank 0 holds it
        else nullcontext()
    )
    with lease:  # taken before looking at the output: the writer before may just finish
        out = StageOutput(call.out) if call.out else None
        if skip_done and out is not None and (done := out.done()) is not None:
            log.info(f"stage {call.stage.value}: {out.uri} already has {RESULT_FILE}; done")
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
        with stop.signals_stop():
            result = _run(call_class, body, argv, skip_done)
    except Exception as err:  # noqa: BLE001 - a stage reports every failure on its way out
        code = exit_code(err)
        if code is ExitCode.FAILED:
            log.error(f"stage {stage} failed:\n{traceback.format_exc()}")
        else:
            log.error(f"stage {stage} failed: {err} ({code.name}, exit {int(code)})")
        return int(code)
    finally:
        distributed.cleanup()
    result.stage = result.stage or stage
    result.seconds = round(time.perf_counter() - t0, 3)
    if distributed.is_main_process():
        emit_result(result)
    return int(ExitCode.OK)
