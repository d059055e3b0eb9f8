"""Data layer: source formats (``formats``), synthetic sources (``synth``), ingest into
versioned shards (``ingest``) and the shard dataset (``shards``).

Import from the submodules; this package imports nothing so that ``synth`` and
``formats`` stay free of torch.
"""
