"""What every stage shares: the one ``main`` around a stage's body.

:func:`stage_main` parses the stage's typed call (:mod:`xlearner.contract`), loads the
config by URI, takes the lease of its output (:mod:`xlearner.lease`: one writer per
output), skips a stage whose output already holds ``result.json``, joins the DDP group
under torchrun (rank 0 holds the lease, decides to skip or run and tells every rank),
runs the body, maps errors to an :class:`~xlearner.contract.ExitCode` (:func:`exit_code`)
and prints (rank 0 only) ``XLEARNER_RESULT {json}`` for the runner. SIGTERM and
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
from contextlib import ExitStack
from typing import TypeVar

from xlearner import distributed, stop
from xlearner.config import ConfigError, PipelineConfig, load_config
from xlearner.contract import RESULT_FILE, RESULT_PREFIX, ExitCode, StageCall, StageResult
from xlearner.lease import DEFAULT_WAIT_S, LeaseHeld, output_lease
from xlearner.outputs import StageOutput
from xlearner.parent_death import die_with_parent
from xlearner.store import StoreError, StoreUnavailable, is_unreachable

log = logging.getLogger("xlearner.stage")

C = TypeVar("C", bound=StageCall)
T = TypeVar("T")
Body = Callable[[C, PipelineConfig, StageOutput | None], StageResult]
BAD_INPUT = (ConfigError, StoreError, ValueError, FileNotFoundError)
TORCHRUN_WORKER_ENV = "TORCHELASTIC_RUN_ID"  # torchrun sets it in each worker
LEASE_WAIT_ENV = "XLEARNER_LEASE_WAIT_S"  # how long a stage waits for its output's writer


def _causes(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def exit_code(err: BaseException) -> ExitCode:
    """What a stage's failure means for the flow (see ExitCode); the cause chain counts:
    a store outage stays transient when code above wraps it in another error."""
    for cause in _causes(err):
        if isinstance(cause, OtherRankFailed):
            return cause.code
        if isinstance(cause, stop.StopRequested):
            return ExitCode.STOPPED
        if isinstance(cause, LeaseHeld):
            return ExitCode.BUSY
        if isinstance(cause, StoreUnavailable) or is_unreachable(cause):
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


class OtherRankFailed(Exception):
    """Rank 0 failed before the body; the other ranks end with its exit code."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(f"rank 0 failed: {message}")
        self.code = code


def _agreed(decide: Callable[[], T]) -> T:
    """Rank 0's ``decide()`` on every rank (under DDP only rank 0 runs it).

    When rank 0 fails, every rank raises (with rank 0's exit code) instead of the others
    going on into the body and waiting there forever for a rank that left.
    """
    answer, failure = None, None
    if distributed.is_main_process():
        try:
            answer = decide()
        except Exception as err:
            failure = err
    told = distributed.broadcast_object(
        None if failure is None else (f"{failure}", int(exit_code(failure)))
    )
    if failure is not None:
        raise failure
    if told is not None:
        raise OtherRankFailed(told[0], ExitCode(told[1]))
    return distributed.broadcast_object(answer)


def _run(call_class: type[C], body: Body, argv: list[str] | None, skip_done: bool) -> StageResult:
    call = call_class.parse(argv)
    if TORCHRUN_WORKER_ENV in os.environ:  # its own session: no group signal reaches it
        die_with_parent(os.getppid())  # SIGTERM (checkpoint, exit) when torchrun dies
    distributed.init_from_env()  # under torchrun: join the process group (no-op otherwise)
    cfg = load_config(call.config, call.overrides)
    call.check()
    with ExitStack() as stack:
        out = StageOutput(call.out) if call.out else None
        if out is not None:
            stack.callback(out.close)  # the local work folder, also when the body failed

        def claim() -> StageResult | None:
            """Rank 0 takes the lease (one writer per output) and looks for the result."""
            if call.out:  # taken before looking at the output: the writer before may finish
                lease = output_lease(
                    call.out,
                    cfg.store.endpoint_url,
                    run=call.mlflow_parent_run_id,
                    wait_s=float(os.environ.get(LEASE_WAIT_ENV, DEFAULT_WAIT_S)),
                )
                stack.enter_context(lease)
            return out.done() if skip_done and out is not None else None

        done = _agreed(claim)  # every rank runs the body, or none does
        if done is not None:
            log.info(f"stage {call.stage.value}: {out.uri} already has {RESULT_FILE}; done")
            done.skipped = True
            return done
        return body(call, cfg, out)


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
    main = True  # rank 0 (or the only process): the one that prints the result line
    try:
        with stop.signals_stop():
            result = _run(call_class, body, argv, skip_done)
            main = distributed.is_main_process()  # asked before leaving the group
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
    if main:
        emit_result(result)
    return int(ExitCode.OK)
