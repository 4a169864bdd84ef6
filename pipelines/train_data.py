"""The packed rows one worker trains on, in an order a resumed run replays exactly.

Ray Data's `streaming_split(equal=True)` with `preserve_order` hands every worker the same rows
in the same order on every run, as long as the dataset's blocks are the same (measured: runs and
consumer timing do not change it, another block size does). The driver therefore pins the number
of read blocks to the shards' row groups, so the split depends on the data and the worker count
only, never on the size of the cluster at the time.

A resumed run skips the micro-batches its epoch already consumed and checks, with a running
digest of their contents, that they are the very batches trained on before: a changed order
(other data, another worker count) stops the run instead of silently training on other rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

TENSOR_COLUMNS = ("input_ids", "labels", "position_ids")
COLUMNS = [*TENSOR_COLUMNS, "seq_lens"]


class DataOrderChanged(RuntimeError):
    """The rows a resumed worker skips are not the rows it trained on before the checkpoint."""


def chain(digest: str, input_ids: np.ndarray) -> str:
    """Extend a running digest with one micro-batch (7 bytes: fits a signed int64 for gathering)."""
    return hashlib.blake2b(digest.encode() + input_ids.tobytes(), digest_size=7).hexdigest()


@dataclass
class Position:
    """Where one worker stands in its shard; saved with every checkpoint, per rank."""

    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch
    epoch_digest: str = ""  # digest of those micro-batches
    digest: str = ""  # digest of every micro-batch of the run
    examples: int = 0  # packed examples consumed (padding is not an example)
    tokens: int = 0  # token positions processed, padding included (it costs compute)

    def to_dict(self) -> dict:
        return asdict(self)


def micro_batches(shard, position: Position, batch_size: int, device: torch.device) -> Iterator[dict]:
    """Micro-batches from `position` on, epoch after epoch; `position` follows what is yielded."""
    while True:
        skip, replayed = position.batches_in_epoch, ""
        seen = 0
        for arrays in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
            ids = np.stack(arrays["input_ids"])
            seen += 1
            if seen <= skip:
                replayed = chain(replayed, ids)
                if seen == skip and replayed != position.epoch_digest:
                    raise DataOrderChanged(
                        f"epoch {position.epoch}: the {skip} micro-batches replayed on resume differ from the ones "
                        "trained before the checkpoint (data or number of workers changed?)")
                continue
            position.batches_in_epoch += 1
            position.epoch_digest = chain(position.epoch_digest, ids)
            position.digest = chain(position.digest, ids)
            position.examples += sum(len(lens) for lens in arrays["seq_lens"])
            position.tokens += ids.size
            batch = {"input_ids": ids, **{k: np.stack(arrays[k]) for k in TENSOR_COLUMNS[1:]}}
            yield {k: torch.as_tensor(v, dtype=torch.long).to(device, non_blocking=True) for k, v in batch.items()}
        if seen < skip:
            raise DataOrderChanged(f"epoch {position.epoch}: the shard now holds {seen} micro-batches, fewer "
                                   f"than the {skip} consumed before the checkpoint")
        if seen == 0:
            raise RuntimeError(f"this worker's shard holds less than one micro-batch ({batch_size} rows)")
        position.epoch += 1
        position.batches_in_epoch, position.epoch_digest = 0, ""
