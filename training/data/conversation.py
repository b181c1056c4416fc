"""Conversations (LLaVA-style QA data) as understanding tasks read them: the turns from the
index row, and the one plain template every tokenizer writes them in.

Turns are ``{"from": "human" | "gpt", "value"}``, alternating, human first, an answer last
(``curation/sources/conversations.py`` checks records when curating). All turns go in one
sequence: ``USER: q1\\nASSISTANT: a1 <eos> USER: q2\\nASSISTANT: a2 <eos>``, the loss on the
answers (and their eos) only, as LLaVA-v1.5 trains its instruction data (HaploOmni trains on
LLaVA-v1.5's 665K, haplo-omni.txt:263; Omni-Video keeps understanding data in the format it
was released in, omni-video.txt:127). The medium's placeholder (``<image>`` / ``<video>``) is
removed from the text: the model's visual tokens lead the sequence, which is where LLaVA's
preprocessing moves the placeholder (before the first question) with no system prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER_PREFIX, ASSISTANT_PREFIX = "USER: ", "\nASSISTANT: "
PLACEHOLDERS = ("<image>", "<video>")

Turns = Sequence[dict[str, Any]]


def prompt_text(question: str) -> str:
    """A human turn as the model reads it: placeholder removed, role markers around it."""
    for mark in PLACEHOLDERS:
        question = question.replace(mark, "")
    return f"{USER_PREFIX}{question.strip()}{ASSISTANT_PREFIX}"


def render_chat(turns: Turns) -> str:
    """The conversation as the template writes it, without special tokens (for logs)."""
    return "".join(prompt_text(t["value"]) if t["from"] == "human" else t["value"] for t in turns)


def sample_conversation(meta: dict[str, Any]) -> list[dict[str, str]] | None:
    """The turns of a sample's index row, or None (no conversation, or one that does not read
    as alternating turns ending with an answer)."""
    turns = meta.get("conversation")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return None
    ok = all(
        isinstance(t, dict)
        and t.get("from") == ("human" if i % 2 == 0 else "gpt")
        and isinstance(t.get("value"), str)
        for i, t in enumerate(turns)
    )
    return [{"from": t["from"], "value": t["value"]} for t in turns] if ok else None
