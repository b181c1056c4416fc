"""Module groups that start from random weights at the production sizes, and the rule that
keeps them out of frozen positions (checked by ``training.recipe.Recipe``, no model built).

At a production size the backbones load pretrained weights, but the glue the papers train from
scratch starts fresh. Such a group must not sit frozen in the path of a stage's training: a
stage that trains a group whose gradients pass through a fresh group (or that learns from its
output) before the fresh group has trained anywhere would learn from random weights. So every
stage up to and including the first one that trains a fresh group must train it whenever it
trains one of its ``LINKED`` groups, and some stage must train it. Tiny sizes start everything
fresh and are not checked.
"""

from __future__ import annotations

import fnmatch

# family -> fresh group -> the groups whose training passes through it (consumers of its
# output on a loss path, or producers whose gradients flow through it)
LINKED: dict[str, dict[str, tuple[str, ...]]] = {
    "omni_video": {  # both new and randomly initialised (omni-video-report.txt:414)
        "vision_head": ("mllm", "adapter", "dit"),
        # the flow loss runs only while the adapter or the DiT trains (``omni_video``), so a
        # stage training the heads alone does not pass through the adapter
        "adapter": ("dit",),
    },
    "haplo_omni": {
        # every connected pass runs pre -> pre_connector -> base (-> post_connector -> post);
        # the warmup stages (those with distill teachers) train the decoders independently,
        # bypassing both connectors (haplo-omni.txt:162, ``HaploOmni._warmup_loss``): exempt
        "pre_connector": ("pre_decoder", "base_decoder", "post_decoder"),
        "post_connector": ("pre_decoder", "base_decoder", "post_decoder"),
    },
    "vino": {  # vino.txt:148-150 (Table 1: stage 1 trains the connector and learnable tokens)
        "learnable_queries": ("vlm", "connector", "mmdit"),
        "connector": ("vlm", "learnable_queries", "mmdit"),
        # the MLP over the VLM's vision start / end states (vino.txt:111): new, like the connector
        "boundary_connector": ("vlm", "mmdit"),
    },
}


def fresh_problems(
    family: str, size: str, stages: list[tuple[str, list[str]]], independent: set[int] = frozenset()
) -> list[tuple[str, str]]:
    """(field path, message) for each fresh group a stage keeps frozen while training through
    it, and each fresh group no stage trains. ``stages``: (name, trainable globs) in order;
    ``independent``: the indices of stages that train their groups on their own, through no
    other group (HaploOmni's warmup), which are not checked."""
    if size == "tiny":
        return []
    problems = []
    for group, linked in LINKED.get(family, {}).items():
        trained = False
        for i, (name, patterns) in enumerate(stages):
            if i in independent:
                continue
            trains = {
                g for g in (group, *linked) if any(fnmatch.fnmatchcase(g, p) for p in patterns)
            }
            if group in trains:
                trained = True
                break
            if trains:
                problems.append(
                    (
                        f"stages.{i}.trainable",
                        f"stage {name!r} trains {', '.join(sorted(trains))} through the module "
                        f"group {group!r}, which starts from random weights at size {size!r} and "
                        f"is frozen in this stage: add {group!r} to its trainable groups (or "
                        f"train {group!r} in an earlier stage)",
                    )
                )
        if not trained:
            problems.append(
                (
                    "stages",
                    f"the module group {group!r} starts from random weights at size {size!r} "
                    f"but no stage trains it",
                )
            )
    return problems
