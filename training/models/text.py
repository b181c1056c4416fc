"""The tiny sizes' text side: byte tokenizer, padding, next-token loss.

Production sizes use the backbone's own tokenizer behind the same contract
(``hf_transformers.HFTokenizer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence -> (ids (B, L) int64, mask (B, L) int64)."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


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


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE of logits (B, L, V) at position i against ids[:, i], padding (mask == 0) ignored."""
    target = ids.masked_fill(mask == 0, -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
