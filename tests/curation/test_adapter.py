"""Resource planning: every stage fits next to the actor pools, on any cluster size."""

import pytest

from catalog.config import load_config
from curation.adapter import plan_resources
from curation.config import CurationConfig
from curation.pipeline import build_stages


@pytest.mark.parametrize("cpus", [1.0, 2.0, 16.0])
def test_a_task_always_fits_beside_one_actor_per_pool(cpus):
    stages, _ = build_stages(load_config(CurationConfig, None, []))
    assert any(s.uses_model for s in stages)  # OCR runs in an actor pool by default
    plan = plan_resources(stages, cpus)
    pools = sum(plan[s.name].cpus for s in stages if s.uses_model)
    assert pools <= cpus / 2 + 1e-9
    for s in stages:
        if not s.uses_model:  # one actor of every pool + this task fit together
            assert pools + plan[s.name].cpus <= cpus + 1e-9, (s.name, plan)
