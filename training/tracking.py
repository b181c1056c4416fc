"""What training logs to MLflow: a parent run per ``train run``, a nested run per stage; rank 0
logs the stage's metrics (``core.tracking.MetricLogger``).

The driver creates the runs (so a stage run exists even if every worker dies) and hands the
stage run id to the workers. Every MLflow call goes through ``core.tracking``.
"""

from __future__ import annotations

from core import tracking


def start_parent(tracking_uri: str, recipe, experiment: str = "training") -> str:
    """Create the parent run of a ``train run`` (params: the whole recipe, masked)."""
    return tracking.start_run(
        tracking_uri, experiment, recipe.name, params=recipe, tags={"omniforge.kind": "training"}
    )


def start_stage(
    tracking_uri: str, parent_id: str, recipe, stage_index: int, inputs: list[str]
) -> str:
    """A nested run for stage ``stage_index``: its params (``stage.*``, ``model.*``) and the
    dataset versions it reads as inputs."""
    stage = recipe.stages[stage_index]
    params = {"stage": stage.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    return tracking.start_run(
        tracking_uri,
        "",
        f"{stage_index + 1}. {stage.name}",
        params=params,
        parent_id=parent_id,
        inputs=inputs,
        tags={"omniforge.stage": stage.name, "omniforge.inputs": ",".join(inputs)},
    )
