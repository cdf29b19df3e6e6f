"""Data locality: "can this run here with this data? If not here, where?"

- `locate` (``fedmount locate``): per collection and per cluster, how many blocks and bytes
  each cluster's Keep holds, what this host's cache has, which cluster would serve each
  block, and transfer-time estimates from the throughput that stages and mounts observed
  (`fedmount.blocks.throughput`); `locate_report` holds the typed answer, its JSON and text.
- `placement` (``fedmount locate --for RECORD``): which cluster could run a container
  (instance types of its exported config, inputs reached, bytes crossing clusters), ranked.
- `stage` (``fedmount stage`` / ``fedmount unpin``): pull collections into the host cache
  ahead of a run, resumable, optionally pinned; `stage_collections` is the entry point
  for ``fedmount-run --stage``; `stage_report` the typed result. `cluster_stage`
  (``stage --to-cluster X``): the same into cluster X's own Keep, keepstore to keepstore.
- `ways`: with ``--route auto`` (the mount's default), which way the mount reads each remote
  cluster's blocks (directly, or through the home) and why, for `locate` and `stage`.
- `view`: the small interface to the federation all of them use; `federation_view`
  implements it over `Federation` and its per-cluster controller clients.
- `arguments`: the commands' help and parsers (light, for ``fedmount --help``);
  `commands`: running them and their exit statuses; `progress`: the progress line;
  `tally`: blocks and bytes.
"""
