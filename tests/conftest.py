"""Shared fixtures: one private Ray instance per test session, and the small data the tests use."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file of the public data set beside the checkout; the test skips when it is absent."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is not available (the public data set lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """A Ray instance of our own (private temp dir, explicit resources), shut down at the end."""
    import ray

    temp = tempfile.mkdtemp(prefix="medray-ray-")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, _temp_dir=temp,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def one_line_error(capsys, run, argv: list[str]) -> str:
    """Run a CLI entry point that must refuse its input: exit 2, one `error:` line, no traceback."""
    capsys.readouterr()  # what the fixtures printed
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: "), err
    return err
