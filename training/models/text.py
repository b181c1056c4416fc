"""The tiny sizes' text side: byte tokenizer, padding, next-token loss; and the conversation
template every tokenizer shares.

Production sizes use the backbone's own tokenizer behind the same contract
(``hf_transformers.HFTokenizer``): called on texts it gives ``(ids, mask)``; ``chat(items)``
gives ``(ids, mask, loss_mask)`` for understanding samples, each item a caption (every token
trained, as a plain call) or a conversation (only the assistant's tokens trained).

Conversations become one sequence, all turns in order, in the template of
``training.data.conversation``: ``[bos] USER: q1\nASSISTANT: a1 [eos] USER: q2\nASSISTANT:
a2 [eos]``, the loss on ``a_i [eos]`` only. Each segment is tokenised alone, so the mask's
edges are exact token boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from training.data.conversation import Turns, prompt_text


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence -> (ids (B, L) int64, mask (B, L) int64)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def chat_ids(
    turns: Turns, encode: Callable[[str], list[int]], prefix: list[int], eos: int | None
) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one conversation: ``prefix`` (e.g. bos) and the human turns
    untrained, each gpt turn and its closing eos trained."""
    ids, loss = list(prefix), [0] * len(prefix)
    for turn in turns:
        if turn["from"] == "human":
            piece = encode(prompt_text(turn["value"]))
            ids += piece
            loss += [0] * len(piece)
        else:
            piece = encode(turn["value"]) + ([] if eos is None else [eos])
            ids += piece
            loss += [1] * len(piece)
    return ids, loss


def pad_chat(
    seqs: list[tuple[list[int], list[int]]], pad_id: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, loss) pairs cut to ``max_len`` (the start kept) -> (ids, mask, loss_mask), (B, L)."""
    ids, mask = pad_sequences([s[:max_len] for s, _ in seqs], pad_id)
    loss, _ = pad_sequences([m[:max_len] for _, m in seqs], 0)
    return ids, mask, loss


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) + pad/bos/eos: ``[bos, bytes..., eos]``, at most max_len ids.

    Long texts keep their first ``max_len - 2`` bytes (eos always ends a sequence); a batch is
    right-padded to its longest sequence. Unencodable characters (lone surrogates) become '?'.
    """

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (bos + 1 byte + eos), got {max_len}")
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [
            [self.BOS, *t.encode("utf-8", errors="replace")[: self.max_len - 2], self.EOS]
            for t in texts
        ]
        return pad_sequences(seqs, self.PAD)

    def chat(self, items: list[str | Turns]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Captions and conversations -> (ids, mask, loss_mask) (module docstring)."""
        seqs = []
        for item in items:
            if isinstance(item, str):
                ids = self([item])[0][0].tolist()
                seqs.append((ids, [1] * len(ids)))
            else:
                encode = self._encode
                seqs.append(chat_ids(item, encode, [self.BOS], self.EOS))
        return pad_chat(seqs, self.PAD, self.max_len)

    @staticmethod
    def _encode(text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE of logits (B, L, V) at position i against ids[:, i], where mask == 0 (padding, or a
    conversation's prompt tokens) is ignored; 0 (with a graph) when nothing is left to learn
    (answers cut off by the text length)."""
    target = ids.masked_fill(mask == 0, -100)
    if not bool((target != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
