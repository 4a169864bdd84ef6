"""LoRA adapters sharing one base model in a replica: loaded on demand, deleted once evicted and idle.

Serve's `@serve.multiplexed` decides which adapters a replica keeps (least recently used go
first, bounded per replica) and drops an evicted adapter's handle by calling its `__del__`;
garbage collection calls it again later, maybe after the same adapter was loaded anew. So a
handle's `__del__` only queues a notice, and the pool deletes an adapter when its notice is
current and no request under way uses it. PEFT cannot drop the last adapter of a model, so the
last one stays until another replaces it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, deque
from pathlib import Path

log = logging.getLogger("ray.serve")

BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch


def require_safetensors(adapter_dir: str | Path) -> None:
    """Adapters are loaded from safetensors only: a pickled adapter_model.bin can run code."""
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter {adapter_dir}: no adapter_model.safetensors (only safetensors are loaded)")


class AdapterHandle:
    """What the multiplexed loader returns; Serve drops it on eviction."""

    def __init__(self, notices: deque, name: str, generation: int):
        self._notices, self.name, self.generation = notices, name, generation

    def __del__(self):
        # May run twice (eviction, then garbage collection) and on any thread, even inside a
        # lock the pool holds: append only, which is atomic and takes no lock.
        self._notices.append((self.name, self.generation))


class AdapterPool:
    """The base model wrapped by PEFT, and which of its adapters are in use or evicted."""

    def __init__(self, base_model, paths: dict[str, str], model_lock: threading.Lock):
        from peft import PeftModel

        self.paths, self.model_lock = paths, model_lock
        for path in paths.values():
            require_safetensors(path)
        # Wrap the base now, with any adapter, so that it is a PeftModel before the first batch:
        # wrapping later would change the modules under a batch that is decoding.
        first = next(iter(paths))
        self.model = PeftModel.from_pretrained(base_model, paths[first], adapter_name=first)
        self.model.eval()
        self._state = threading.Lock()
        self._generations = itertools.count(1)
        self._live: dict[str, int] = {}  # adapter -> generation of the handle Serve holds
        self._evicted = {first}  # in the model, held by no handle
        self._users: Counter[str] = Counter()
        self._notices: deque[tuple[str, int]] = deque()

    def load(self, name: str) -> AdapterHandle:
        """Load `name` (blocking: call it in a thread) and return the handle Serve keeps."""
        with self.model_lock:
            self._sweep()
            with self._state:
                present = name in self._evicted
                self._evicted.discard(name)
            if not present:
                self.model.load_adapter(self.paths[name], adapter_name=name)
                self.model.eval()
                log.info("adapter %s loaded", name)
            with self._state:
                self._live[name] = generation = next(self._generations)
        return AdapterHandle(self._notices, name, generation)

    def acquire(self, name: str) -> None:
        with self._state:
            self._users[name] += 1

    def release(self, name: str) -> None:
        with self._state:
            self._users[name] -= 1

    def sweep(self) -> None:
        """Delete evicted adapters that no request uses (blocking: call it in a thread); it waits
        for the forward pass under way only when there is something to delete."""
        with self._state:
            idle = any(not self._users[n] for n in self._evicted) and len(self.model.peft_config) > 1
        if self._notices or idle:
            with self.model_lock:
                self._sweep()

    def _sweep(self) -> None:
        with self._state:
            while self._notices:
                name, generation = self._notices.popleft()
                if self._live.get(name) == generation:  # a stale notice is about an older load
                    del self._live[name]
                    self._evicted.add(name)
            doomed = [n for n in self._evicted if not self._users[n]]
            doomed = doomed[:len(self.model.peft_config) - 1]  # PEFT needs one adapter left
            self._evicted.difference_update(doomed)
        for name in doomed:
            self.model.delete_adapter(name)
            log.info("adapter %s unloaded", name)
