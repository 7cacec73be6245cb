"""Token-id sequences as padded batches: the one padding helper of the project.

`left_pad` is the layout of prompts (generation, and the prompt half of the trainer's
`[left-padded prompt | right-padded response]` batches), `right_pad` that of responses and scored texts.
Both return `(ids, mask)`: `ids` (B, W) long, filled with `pad_id`; `mask` (B, W) long, 1 on real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, width: int | None, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max((len(s) for s in seqs), default=0)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {longest} tokens does not fit in width {width}")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            where = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, where] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, where] = 1
    return ids, mask


def left_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, width): row b ends with `seqs[b]`, padding before it. `width` defaults to the
    longest sequence; a longer sequence raises `ValueError`."""
    return _pad(seqs, pad_id, width, left=True)


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, *, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, width): row b starts with `seqs[b]`, padding after it (see `left_pad`)."""
    return _pad(seqs, pad_id, width, left=False)
