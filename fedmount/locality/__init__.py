"""Data locality: "can this run here with this data?"

- `locate` (``fedmount locate``): per collection and per cluster, how many blocks and bytes
  each cluster's Keep holds, what this host's cache has, which cluster would serve each
  block, and transfer-time estimates from the throughput that stages and mounts observed
  (`fedmount.blocks.throughput`).
- `stage` (``fedmount stage`` / ``fedmount unpin``): pull collections into the host cache
  ahead of a run, resumable, optionally pinned; `stage_collections` is the entry point
  for ``fedmount-run --stage``.
- `view`: the small interface to the federation both use; `federation_view` implements it
  over `Federation` and its per-cluster controller clients (`Federation.controller`).
- `progress`: the progress line; `commands`: argument parsing and exit statuses.
"""
