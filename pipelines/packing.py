"""Sequence packing: several examples per fixed-length row, each still isolated in training.

Examples are placed by best-fit decreasing within a window (a batch of examples): longest first,
each into the open row with the least room that still fits it. A row stores where its examples
start through `position_ids` that restart at 0 for every example; the model uses them to keep
attention inside each example (see `pipelines.train_loop`), and the first label of every
example is -100 so no example is trained to predict its neighbour's first token.
"""

from __future__ import annotations

import bisect

IGNORE = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's total length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    # (free room, bin index), kept sorted so the tightest fitting bin is a bisect away.
    free: list[tuple[int, int]] = []
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def pack_examples(input_ids: list[list[int]], labels: list[list[int]], length: int, pad_id: int,
                  ) -> dict[str, list]:
    """Pack examples (each already <= length) into rows of exactly `length` tokens."""
    bins = best_fit_decreasing([len(x) for x in input_ids], length)
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "num_tokens": []}
    for members in bins:
        ids, labs, pos, lens = [], [], [], []
        for i in members:
            n = len(input_ids[i])
            ids.extend(input_ids[i])
            labs.append(IGNORE)
            labs.extend(labels[i][1:])
            pos.extend(range(n))
            lens.append(n)
        used = len(ids)
        pad = length - used
        # Padding is its own pseudo-example (positions restart) with no loss on it.
        rows["input_ids"].append(ids + [pad_id] * pad)
        rows["labels"].append(labs + [IGNORE] * pad)
        rows["position_ids"].append(pos + list(range(pad)))
        rows["seq_lens"].append(lens)
        rows["num_tokens"].append(used)
    return rows
