"""Every key of the artifact store, in one place.

```
sources/<name>/latest.json                  -> {"version", "manifest"}
sources/<name>/<version>/manifest.json      written last: its presence = published
sources/<name>/<version>/{train,val}-NNNNNN.tar
runs/config/<hash>.json                     the configs the stages read
runs/<stage>/<cache key>/...                stage outputs
runs/<stage>/<cache key>/result.json        written last: its presence = stage done
runs/<stage>/<cache key>/checkpoints/       engine checkpoints (resume)
sensor/<config name>/announced.json         source versions the sensor announced
results/<config name>/latest.json           the last run's transfer outputs per seed
```
"""

from __future__ import annotations

from xlearner.store import join

SOURCES = "sources"
RUNS = "runs"
SENSOR = "sensor"
RESULTS = "results"
LATEST = "latest.json"
MANIFEST = "manifest.json"
RESULT = "result.json"  # a stage output's commit marker, written last
CHECKPOINTS = "checkpoints"  # relative to a stage output
CONFIG_KEY_LENGTH = 20


def source_prefix(name: str, version: str | None = None) -> str:
    return join(SOURCES, name, version or "")


def source_latest(name: str) -> str:
    return join(SOURCES, name, LATEST)


def manifest_key(name: str, version: str) -> str:
    return join(source_prefix(name, version), MANIFEST)


def manifest_version(uri: str) -> str | None:
    """The version in a published manifest's URI or key
    (``.../sources/<name>/<version>/manifest.json``), else None."""
    parts = uri.split("/")
    if len(parts) >= 4 and parts[-1] == MANIFEST and parts[-4] == SOURCES:
        return parts[-2]
    return None


def parse_source_latest(key: str) -> str | None:
    """The source name of a ``sources/<name>/latest.json`` key, else None."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == SOURCES and parts[2] == LATEST:
        return parts[1]
    return None


def stage_prefix(stage: str, key: str | None = None) -> str:
    return join(RUNS, stage, key or "")


def stage_result(stage: str, key: str) -> str:
    return join(stage_prefix(stage, key), RESULT)


def is_stage_result(key: str) -> bool:
    return key.endswith("/" + RESULT) or key == RESULT


def config_key(digest: str) -> str:
    return join(RUNS, "config", f"{digest[:CONFIG_KEY_LENGTH]}.json")


def sensor_state(config_name: str) -> str:
    return join(SENSOR, config_name, "announced.json")


def results_latest(config_name: str) -> str:
    """The pointer to a config's last run: its transfer outputs per seed (``xlearner report``)."""
    return join(RESULTS, config_name, LATEST)
