"""Connecting to Ray: the cluster at --address / RAY_ADDRESS, else a local one on this machine."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# What every Ray worker needs to see: nothing is ever fetched from a model hub at run time.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def init_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: os.environ[k] for k in WORKER_ENV}}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=True)
    import ray.data

    # Progress bars per operator are noise in job logs; one global bar is enough.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_operator_progress_bar = False
