"""Conversation (LLaVA-style QA) samples in the understanding tasks: the loss mask covers
exactly the assistant's tokens, captions stay the fallback, and a stage of understanding on QA
shards trains through the real trainer."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from catalog.shards import ShardWriter, bucket_name, sample_json
from core.config import load_config
from training.data.conversation import render_chat, sample_conversation
from training.data.loaders import TaskLoader
from training.models import omni_video
from training.models.text import ByteTokenizer, next_token_loss
from training.recipe import Recipe
from training.trainer import StageSpec, Trainer, process_group

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "omni_video_tiny.yaml"

TURNS = [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "Colour?"},
    {"from": "gpt", "value": "Orange."},
]


def trained_text(ids: torch.Tensor, loss: torch.Tensor) -> bytes:
    """The bytes (and eos markers) the loss reads, in order."""
    out = bytearray()
    for i, m in zip(ids.tolist(), loss.tolist(), strict=True):
        if m:
            out += bytes([i]) if i < 256 else b"|"
    return bytes(out)


def test_the_loss_mask_covers_exactly_the_assistant_tokens():
    tok = omni_video.build_tiny().tokenizer  # the tiny model's tokenizer
    assert isinstance(tok, ByteTokenizer)
    tok = ByteTokenizer(256)  # the same tokenizer with room for two rounds
    ids, mask, loss = tok.chat([TURNS, "a caption"])
    # conversation: every token is attended, only the answers and their eos are trained
    n = int(mask[0].sum())
    assert trained_text(ids[0, :n], loss[0, :n]) == b"A cat.|Orange.|"
    text = bytes(i for i in ids[0, :n].tolist() if i < 256)
    assert text == b"USER: What is it?\nASSISTANT: A cat.USER: Colour?\nASSISTANT: Orange."
    assert text.decode() == render_chat(TURNS)  # the placeholder leaves the text
    assert ids[0, 0] == tok.BOS and loss[0, 0] == 0
    # a caption trains every token, exactly as a plain call tokenises it
    plain_ids, plain_mask = tok(["a caption"])
    width = plain_ids.shape[1]
    assert torch.equal(ids[1, :width], plain_ids[0]) and torch.equal(loss[1], mask[1])
    assert torch.equal(mask[1, :width], plain_mask[0]) and not mask[1, width:].any()


def test_a_backbone_tokenizer_masks_the_same_turns():
    """The production tokenizer wrapper (a byte-level Qwen2 tokenizer, built here)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    from training.models.hf_transformers import HFTokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    hf = Qwen2Tokenizer(vocab=vocab, merges=[])
    hf.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tok = HFTokenizer(hf, 256)
    ids, mask, loss = tok.chat([TURNS, "a caption"])
    n = int(mask[0].sum())
    answers = [i for i, m in zip(ids[0, :n].tolist(), loss[0, :n].tolist(), strict=True) if m]
    assert hf.decode(answers) == "A cat.<|im_end|>Orange.<|im_end|>"
    assert hf.decode(ids[0, :n]) == render_chat(TURNS).replace("A cat.", "A cat.<|im_end|>") + (
        "<|im_end|>"
    )
    plain, _ = tok(["a caption"])
    assert torch.equal(ids[1, : plain.shape[1]], plain[0]) and torch.equal(loss[1], mask[1])


def test_truncation_keeps_the_start_and_an_empty_answer_set_is_no_loss():
    tok = ByteTokenizer(24)  # cuts inside the first question: no answer token is left
    ids, mask, loss = tok.chat([TURNS])
    assert ids.shape[1] == 24 and not loss.any()
    logits = torch.randn(1, 24, tok.vocab_size, requires_grad=True)
    value = next_token_loss(logits, ids, loss)
    assert value.item() == 0.0 and value.requires_grad  # finite: the step goes on
    full = next_token_loss(logits, ids, mask)
    assert math.isfinite(full.item()) and full.item() > 0


def test_malformed_conversations_are_not_read():
    assert sample_conversation({"conversation": TURNS}) == TURNS
    assert sample_conversation({"conversation": TURNS[:3]}) is None  # no final answer
    assert sample_conversation({"conversation": TURNS[1:3]}) is None  # gpt first
    assert sample_conversation({"caption": "x"}) is None


@pytest.fixture(scope="module")
def qa_shards(tmp_path_factory) -> Path:
    """Eight QA images (one round, short enough for the tiny model's 32 tokens) and four
    captioned ones, in one bucket."""
    root = tmp_path_factory.mktemp("qa-shards")
    writer = ShardWriter(str(root), prefix="q", max_samples=4)
    for i in range(12):
        png = io.BytesIO()
        Image.new("RGB", (96, 96), (20 * i, 255 - 20 * i, 90)).save(png, format="PNG")
        row = {"key": f"qa{i:02d}", "kind": "image", "status": "accepted", "width": 96,
               "height": 96, "num_frames": 1}  # fmt: skip
        if i < 8:
            turns = [{"from": "human", "value": "<image>\nHue?"}, {"from": "gpt", "value": f"C{i}"}]
            row.update(conversation=turns, num_turns=2)
        else:
            row.update(caption=f"picture {i}")
        writer.write(bucket_name(96, 96, 1), row["key"], {"json": sample_json(row),
                     "txt": (row.get("caption") or "").encode(), "png": png.getvalue()})  # fmt: skip
    writer.close()
    return root


def test_the_loader_tokenises_conversations_with_captions_as_the_fallback(qa_shards):
    model = omni_video.build_tiny()
    shards = sorted(str(p) for p in qa_shards.rglob("*.tar"))
    with TaskLoader(
        "image_understanding",
        shards,
        tokenize=model.tokenize,
        geometry=model.geometry,
        frame_area=4096,
        token_budget=4096,
        seed=3,
    ) as loader:
        (shape,) = loader.shapes
        batch = loader.next_batch(shape, 12)
    assert batch.loss_mask is not None
    for i, key in enumerate(batch.keys):
        n = int(batch.attention_mask[i].sum())
        trained = trained_text(batch.input_ids[i, :n], batch.loss_mask[i, :n])
        if int(key[2:]) < 8:  # the answer and its eos only
            assert trained == f"C{int(key[2:])}|".encode()
            assert batch.texts[i] == f"USER: Hue?\nASSISTANT: C{int(key[2:])}"
        else:  # a caption: every token, as before
            assert torch.equal(batch.loss_mask[i], batch.attention_mask[i])
    loss = model.task_loss(batch)["loss"]
    assert math.isfinite(loss.item())


class NoRayTrain:
    """What a Trainer needs from Ray Train, in-process: reports are dropped, no resume."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        pass

    @contextmanager
    def latest_checkpoint(self) -> Iterator[None]:
        yield None


def test_an_understanding_stage_trains_on_qa_shards_through_the_trainer(qa_shards, tmp_path):
    recipe = load_config(
        Recipe,
        RECIPE,
        [
            f"data.curated.uri={qa_shards}",
            "stages.0.steps=2",
            "stages.0.checkpoint_every=2",
            "stages.0.trainable=[text_head]",
            "stages.0.tasks={image_understanding: {weight: 1.0, data: curated}}",
        ],
    )
    spec = StageSpec(recipe=recipe.model_dump(mode="json"), stage_index=0, output=str(tmp_path))
    with process_group():
        t = Trainer(spec, NoRayTrain())
        try:
            check_two_steps(t)
        finally:
            t.data.close()
            for loader in t.loaders.values():
                loader.close()


def check_two_steps(t: Trainer) -> None:
    """Two optimizer steps of understanding on QA data move the text head."""
    head = t.engine.module.groups["text_head"]
    before = [p.detach().clone() for p in head.parameters()]
    first, second = t.train_step(), t.train_step()
    assert math.isfinite(first["loss"]) and first["grad_norm"] > 0
    assert math.isfinite(second["loss"])
    assert dict(t.task_counts) == {"image_understanding": 2}
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))


def test_the_data_check_counts_a_conversation_as_text_for_understanding_only(qa_shards):
    """Eight of the twelve samples have no caption, only a conversation: understanding has
    text for all, text-to-image lacks it for eight."""
    from training.preflight import check_data

    tasks = "{image_understanding: {weight: 1.0, data: curated}, t2i: {weight: 1.0, data: curated}}"
    recipe = load_config(
        Recipe, RECIPE, [f"data.curated.uri={qa_shards}", f"stages.0.tasks={tasks}"]
    )
    check = check_data(recipe, world_size=1, geometry=None, stages=[0])
    missing = {p.task: p.message for p in check.problems if p.code == "missing_text"}
    assert set(missing) == {"t2i"} and missing["t2i"].startswith("8 of 12 image samples")
