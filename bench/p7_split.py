"""P7 scene split: the gradual-transition detector's cost over the content detector alone.

The split stage as ``curate run`` runs it (one decode pass per video that also samples every
clip's frames, ``curation.scan``) on P1's clip set plus the real cockatoo clip (1280x720, 9 s):
``split.gradual`` on (ours: hard cuts, dissolves and fades) against off (baseline: the content
detector only), same process, same probed rows. The figure is video seconds split per second;
probing is done once, outside the timing. A second row times the learned backend
(``split.transnet``: TransNetV2 on CPU, the package's weights) on the same videos, no goal.
"""

from __future__ import annotations

from bench.clips import clip_set
from bench.harness import REPO, WORK, Context, Row, log, ratio


def rows_to_split(quick: bool) -> list[dict]:
    from curation.config import CurationConfig
    from curation.sources import list_inputs
    from curation.stages.probe import ProbeStage

    inputs, _ = clip_set(WORK, quick)
    # P1's set has the other real clips; cockatoo is read in place (P1's set stays as it is)
    data = list_inputs(str(REPO / "tests" / "data"))
    cockatoo = [r for r in data if r["source_uri"].endswith("cockatoo_9s.mp4")]
    rows = [{**r, "caption": "c"} for r in list_inputs(str(inputs)) + cockatoo]
    probed = ProbeStage(CurationConfig().probe).process_batch(rows)
    return [r for r in probed if r["status"] is None and r.get("kind") == "video"]


def make_stage(**split):
    from curation.config import CurationConfig
    from curation.stages.split import SceneSplitStage

    cfg = CurationConfig.model_validate({"split": split})
    stage = SceneSplitStage(cfg.split, cfg.frames)
    stage.setup()  # TransNetV2's weights load once per worker, outside the figure
    return stage


def split_all(stage, rows: list[dict]) -> int:
    return sum(len(stage.process_batch([r])) for r in rows)


def run(ctx: Context) -> list[Row]:
    rows = rows_to_split(ctx.quick)
    seconds = sum(float(r["duration"]) for r in rows)
    frames = sum(int(r["num_frames"]) for r in rows)
    log(f"  {len(rows)} videos, {seconds:.1f} s of video, {frames} frames")
    stages = {
        "gradual": make_stage(gradual=True),
        "content": make_stage(gradual=False),
        "transnet": make_stage(transnet=True),
    }
    t = {
        name: ctx.time(lambda stage=stage: split_all(stage, rows), label=f"split, {name}")
        for name, stage in stages.items()
    }
    common = "one process; frames sampled in the same pass; P1's clip set (with counter, fades, "
    common += "realshort) and cockatoo (1280x720, 9 s)"

    def row(name: str, what: str, goal: str | None, note: str) -> Row:
        """``name``'s figure against the content detector alone."""
        return Row(
            "P7",
            f"scene split with {what}, {len(rows)} videos: video-s/s",
            seconds / t[name].median,
            "video-s/s",
            "the same split, content detector only",
            seconds / t["content"].median,
            ratio(t["content"].median, t[name].median),
            goal,
            note=f"{note}; {common}",
        )

    ms = {name: 1000 * timing.median / frames for name, timing in t.items()}
    return [
        row("gradual", "gradual transitions", ">= 0.8",
            f"{t['gradual'].extra[-1]} clips with, {t['content'].extra[-1]} without"),
        row("transnet", "TransNetV2 (CPU)", None,
            f"{t['transnet'].extra[-1]} clips; {ms['transnet']:.1f} ms a frame (content only: "
            f"{ms['content']:.1f})"),
    ]  # fmt: skip
