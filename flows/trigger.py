"""Retrain when a source lands: a sensor over the store's ``sources/`` prefix.

Webhooks are a Prefect Cloud feature; on a self-hosted server a scheduled sensor flow
(:func:`watch_sources`) lists ``sources/*/latest.json`` and emits one
``xlearner.source.landed`` event per source version it has not announced yet. The
pipeline deployment carries a ``DeploymentEventTrigger`` on that event
(:func:`landed_trigger`) whose parameters are the event's payload ``config``: the
deployment's config plus every source of the store it does not list yet, so the
triggered run trains on the updated source list. ``xlearner sources add``
(:func:`add_source`) ingests one source and emits the same event at once.

Did the new source help? A source the config did not list joins the triggered run
together with a ``without:<source>`` comparison (:func:`helped_entry`): the same
X-Learner trained without it, so the run's report has that row and its claims table the
claim "<source> helps" (:mod:`xlearner.claims`). A new version of a listed source gets
no such row: the question there is the data, not the source.

Only declared sources are trusted (:func:`trusted_sources`): whoever can write to the
store must not choose what the pipeline trains on (a foreign ``latest.json`` naming
``source_uri: /root/.ssh``). A landed source is announced when the deployment's config
lists it and its manifest names the configured ``uri``, or, for a source the config does
not list, when its manifest's ``source_uri`` lies under one of the data roots that the
operator set in the sensor's environment (``XLEARNER_DATA_ROOTS``, :mod:`flows.operator`);
any other is reported (a warning) and ignored.

Once per change:

- a version is news until it was announced (recorded in
  ``sensor/<config name>/announced.json`` in the store, written after the emit) or a
  pipeline run ingested it itself (``runs/ingest/*/result.json`` lists it), so the
  sources a pipeline run publishes never trigger another run;
- the event id is a hash of (config, source, version): after a crash between the emit
  and the record, the next scan emits the same id again and the Prefect server drops
  it as a duplicate (it remembers event ids for 5 minutes or more; after a longer outage the
  re-run finds every stage's output in the store and only re-ingests).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_API_URL
from prefect.utilities.asyncutils import run_coro_as_sync

from flows.operator import DATA_ROOTS_ENV, data_roots, is_under
from xlearner.config import ConfigError, PipelineConfig, Variant, validate_config
from xlearner.config.pipeline import WITHOUT
from xlearner.contract import Stage
from xlearner.store import ArtifactStore, StoreError, open_store
from xlearner.store_keys import (
    SOURCES,
    is_stage_result,
    manifest_key,
    parse_source_latest,
    sensor_state,
    source_prefix,
    stage_prefix,
)

LANDED_EVENT = "xlearner.source.landed"
RESOURCE_PREFIX = "xlearner.source."
CONFIG_LABEL = "xlearner.config"  # resource label: which deployment's config the event is for
STATE_FORMAT = "xlearner-sensor/1"
EVENT_NAMESPACE = uuid.UUID("6f1f3b4e-2d5c-4c1e-9a57-7d4a1f0c3b21")
ANNOUNCED = "announced"
INGESTED = "ingested by a pipeline run"

logger = logging.getLogger(__name__)
LogFn = Callable[[str], None]


@dataclass(frozen=True)
class Landed:
    """One published source version (``sources/<name>/latest.json``)."""

    name: str
    version: str
    manifest: str  # store URI of its manifest.json


def latest_versions(store: ArtifactStore, warn: LogFn = logger.warning) -> dict[str, Landed]:
    """The latest published version of every source in the store (malformed ones reported)."""
    landed = {}
    for key in store.list(SOURCES):
        if (name := parse_source_latest(key)) is not None:
            latest = store.read_json(key)
            if not (isinstance(latest, dict) and {"version", "manifest"} <= latest.keys()):
                warn(f"{store.uri(key)} has no version and manifest: ignored")
                continue
            landed[name] = Landed(name, str(latest["version"]), store.uri(str(latest["manifest"])))
    return landed


def trusted_sources(
    cfg: PipelineConfig,
    store: ArtifactStore,
    landed: dict[str, Landed],
    roots: Iterable[str],
    warn: LogFn = logger.warning,
) -> dict[str, Landed]:
    """The landed sources the sensor may announce; every other one is reported and dropped.

    A listed source must name its configured ``uri`` in its manifest; an unlisted one must
    have its ``source_uri`` under one of ``roots``.
    """
    listed = {s.name: s.uri for s in [*cfg.sources, *cfg.downstream]}
    roots = list(roots)
    trusted = {}
    for name, version in sorted(landed.items()):
        try:
            source_uri = str(store.read_json(manifest_key(name, version.version))["source_uri"])
        except (StoreError, KeyError, TypeError) as err:
            warn(f"source {name} landed without a readable manifest ({err}): ignored")
            continue
        if name in listed and source_uri != listed[name]:
            warn(
                f"source {name} landed from {source_uri}, but config {cfg.name} reads it from "
                f"{listed[name]}: ignored (not the declared source)"
            )
        elif name not in listed and not is_under(source_uri, roots):
            why = (
                f"that is not under the data roots {', '.join(roots)}"
                if roots
                else f"no data roots are set ({DATA_ROOTS_ENV})"
            )
            warn(
                f"source {name} landed from {source_uri}: config {cfg.name} does not list it "
                f"and {why}: ignored"
            )
        else:
            trusted[name] = version
    return trusted


def ingested_versions(store: ArtifactStore) -> dict[str, set[str]]:
    """Source versions that pipeline runs ingested themselves (their ingest results)."""
    seen: dict[str, set[str]] = {}
    for key in store.list(stage_prefix(Stage.ingest)):
        if is_stage_result(key):
            for name, version in store.read_json(key).get("versions", {}).items():
                seen.setdefault(name, set()).add(version)
    return seen


def read_state(store: ArtifactStore, config_name: str) -> dict[str, dict[str, str]]:
    """``{source: {version: why it is known}}``; empty before the first announcement."""
    key = sensor_state(config_name)
    if not store.exists(key):
        return {}
    state = store.read_json(key)
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"{store.uri(key)}: unknown sensor state format {state.get('format')!r} "
            f"(expected {STATE_FORMAT!r}); delete it to re-announce every source not yet ingested"
        )
    return state["known"]


def write_state(store: ArtifactStore, config_name: str, known: dict[str, dict[str, str]]) -> None:
    store.write_json(sensor_state(config_name), {"format": STATE_FORMAT, "known": known})


def helped_entry(cfg: PipelineConfig, source: str) -> str:
    """The compare entry that trains ``cfg``'s X-Learner without ``source``: did it help?

    ``without:<source>``, or, for a source that is the only one of its single task,
    ``without:<task>`` (the same run: leaving the source out leaves the task out).
    Raises ``ValueError`` (why ``without:<source>`` is refused) when no entry isolates
    it: the only source of one of several tasks it feeds (an unlabeled source).
    """
    (added,) = [s for s in cfg.sources if s.name == source]
    try:
        cfg.without(source)
        return f"{WITHOUT}{source}"
    except ValueError:
        (task, *others) = added.resolved_tasks
        if others or cfg.sources_for(task) != [added]:
            raise
    cfg.without(task.value)
    return f"{WITHOUT}{task.value}"


def updated_config(
    cfg: PipelineConfig,
    store: ArtifactStore,
    landed: dict[str, Landed],
    compare_new: Iterable[str] = (),
    log: LogFn = logger.info,
) -> PipelineConfig:
    """``cfg`` plus every landed source it does not list, as a training source.

    Sources the config lists keep their entries: the run re-ingests them from their
    configured ``uri`` (which is what :func:`add_source` ingested). A new source takes
    its format, location and split from its manifest. Each new source named in
    ``compare_new`` (the ones announced now) also gets its :func:`helped_entry` in
    ``compare``, and ``xlearner`` joins ``compare`` when it is not the run's variant:
    that row is what the one without the source is measured against.
    """
    data = cfg.model_dump(mode="json")
    listed = {s.name for s in [*cfg.sources, *cfg.downstream]}
    new = sorted(set(landed) - listed)
    for name in new:
        manifest = store.read_json(manifest_key(name, landed[name].version))
        data["sources"].append(
            {
                "name": name,
                "format": manifest["format"],
                "uri": manifest["source_uri"],
                "val_fraction": manifest["split"]["val_fraction"],
                "split_seed": manifest["split"]["seed"],
            }
        )
    origin = f"{cfg.name} + the sources in {store.uri(SOURCES)}"
    updated = validate_config(data, origin=origin)
    entries = []
    for name in sorted(set(compare_new) & set(new)):
        try:
            entry = helped_entry(updated, name)
        except ValueError as err:
            log(f"no `{WITHOUT}` row for the new source {name}: {err}")
            continue
        if entry not in updated.compare:
            entries.append(entry)
    if not entries:
        return updated
    reference = (
        [] if Variant.xlearner in (updated.variant, *updated.compare) else [Variant.xlearner]
    )
    data["compare"] = [*data["compare"], *reference, *entries]
    log(f"{cfg.name} retrains with compare {', '.join(entries)}: did the new source help?")
    return validate_config(data, origin=origin)


def event_id(config_name: str, landed: Landed) -> uuid.UUID:
    """The same (config, source, version) always gets the same event id (server-side dedupe)."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{config_name}/{landed.name}/{landed.version}")


def landed_event(config: PipelineConfig, landed: Landed):
    from prefect.events import Event

    return Event(
        id=event_id(config.name, landed),
        event=LANDED_EVENT,
        resource={
            "prefect.resource.id": f"{RESOURCE_PREFIX}{landed.name}",
            "prefect.resource.name": landed.name,
            CONFIG_LABEL: config.name,
            "xlearner.source.version": landed.version,
        },
        # Defaults left out: a deployment made before a new config field still accepts it.
        payload={**asdict(landed), "config": config.model_dump(mode="json", exclude_defaults=True)},
    )


def emit_events(events: Iterable[Any]) -> None:
    """Send events to the Prefect server now (not through the background worker)."""
    from prefect.events.clients import get_events_client

    async def send() -> None:
        async with get_events_client() as client:
            for event in events:
                await client.emit(event)

    run_coro_as_sync(send())


def landed_trigger(config_name: str):
    """The pipeline deployment's trigger: one run per landed event for this config."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"xlearner-retrain-{config_name}",
        description="Retrain when a source version lands in the store (flows/trigger.py)",
        expect={LANDED_EVENT},
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}*", CONFIG_LABEL: config_name},
        parameters={"config": "{{ event.payload.config }}"},
    )


def announce(
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    only: Iterable[str] | None = None,
    adopt_new_sources: bool = True,
    source_roots: Iterable[str] | None = None,
    emit: Callable[[list[Any]], None] = emit_events,
    log: LogFn = logger.info,
    warn: LogFn = logger.warning,
) -> list[Landed]:
    """Emit one event per trusted source version not announced or ingested yet; returns them.

    ``only``: consider just these sources. ``adopt_new_sources=False``: sources the
    config does not list are ignored (logged) instead of joining the next run.
    ``source_roots``: where unlisted sources may live (default: :func:`flows.operator.data_roots`).
    """
    roots = data_roots() if source_roots is None else source_roots
    landed = trusted_sources(cfg, store, latest_versions(store, warn), roots, warn)
    known = read_state(store, cfg.name)
    wanted = set(landed) if only is None else set(only)
    fresh = {n: v for n, v in landed.items() if n in wanted and v.version not in known.get(n, {})}
    changed = False
    if fresh:  # sources that a pipeline run published are not news
        for name, versions in ingested_versions(store).items():
            if name in fresh and fresh[name].version in versions:
                known.setdefault(name, {})[fresh.pop(name).version] = INGESTED
                changed = True
    if not adopt_new_sources:
        listed = {s.name for s in [*cfg.sources, *cfg.downstream]}
        for name in sorted(set(fresh) - listed):
            log(f"source {name} landed but config {cfg.name} does not list it: ignored")
            del fresh[name]
        landed = {n: v for n, v in landed.items() if n in listed}
    if fresh:
        config = updated_config(cfg, store, landed, compare_new=fresh, log=log)
        emit([landed_event(config, v) for v in fresh.values()])
        for v in fresh.values():
            known.setdefault(v.name, {})[v.version] = ANNOUNCED
            log(f"announced {v.name} version {v.version} -> retraining {cfg.name}")
    if fresh or changed:
        write_state(store, cfg.name, known)  # after the emit: a crash re-emits the same ids
    return list(fresh.values())


def deployment_config(deployment: str) -> PipelineConfig:
    """The default ``config`` parameter of a pipeline deployment (``flow/deployment``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parameters = client.read_deployment_by_name(deployment).parameters
    if "config" not in parameters:
        raise ConfigError(f"deployment {deployment!r} has no default `config`; redeploy it")
    return validate_config(parameters["config"], origin=f"deployment {deployment}")


@flow(name="xlearner-source-sensor", log_prints=True)
def watch_sources(deployment: str, adopt_new_sources: bool = True) -> list[dict]:
    """Announce every source version that landed since the last scan (scheduled)."""
    logger = get_run_logger()
    log = logger.info
    cfg = deployment_config(deployment)
    store = open_store(cfg.store.uri, cfg.store.endpoint_url)
    announced = announce(
        cfg, store, adopt_new_sources=adopt_new_sources, log=log, warn=logger.warning
    )
    if not announced:
        log(f"no new source versions under {store.uri(SOURCES)}")
    return [asdict(v) for v in announced]


def add_source(cfg: PipelineConfig, name: str) -> str:
    """Ingest one source of ``cfg`` into its store and announce it (``xlearner sources add``)."""
    from xlearner.data.ingest import ingest_source

    every = {s.name: s for s in [*cfg.sources, *cfg.downstream]}
    if name not in every:
        raise ConfigError(
            f"source {name!r} is not in config {cfg.name!r} (sources: {sorted(every)}); "
            f"add it under `sources:` with its name, format and uri first"
        )
    store = open_store(cfg.store.uri, cfg.store.endpoint_url)
    manifest = ingest_source(
        every[name], store, image_size=cfg.model.image_size, options=cfg.ingest, log=logger.info
    )
    version = manifest["version"]
    published = (
        f"{name}: version {version} is published at {store.uri(source_prefix(name, version))}"
    )
    if not PREFECT_API_URL.value():
        return f"{published}; PREFECT_API_URL is not set: no event (the sensor will announce it)"
    if not announce(cfg, store, only=[name]):
        return f"{published}; it was announced or trained on before: nothing to do"
    return f"{published}; emitted {LANDED_EVENT}: {cfg.name} retrains"
