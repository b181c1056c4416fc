"""The bottom layer: plumbing every package uses and nothing of omniforge's own below it.

- ``config``: typed YAML configs (pydantic models, ``--set`` overrides, config hashes)
- ``secrets``: secret values from the environment or files, masking in logs and params
- ``compat``: the torchvision guard that lets ``open_clip`` / ``transformers`` import next to
  a CPU torch
- ``tracking``: every MLflow call (runs, params, metrics, artifacts, links)
- ``weights``: where model weights are on local disk (the lookup curation and training share)
  and the errors when they are not

Imports flow one way: orchestration -> (curation, training) -> catalog -> core.
"""
