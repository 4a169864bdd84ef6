"""Give back the workers' resources of a trial the scheduler stopped.

Ray Train (V2) reserves a trial's workers in a placement group that its controller creates; such a
group lives as long as the job (the sweep's driver), not the controller. When ASHA stops a trial,
Tune kills the trial and its controller mid-run, and only Ray's PlacementGroupCleaner would remove
the group: it asks the State API, which needs the dashboard (off for local runs and in tests), and
fails when several Ray instances share a machine. Every stopped trial would then keep its CPUs
until the sweep ends, and the next trials' data loading waits forever. So the trial records its
placement group, and the sweep's driver removes it once Tune is done with the trial.
"""

from __future__ import annotations

from pathlib import Path

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback

PLACEMENT_GROUP_FILE = "placement_group.id"


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the Train controller: writes the id of the workers' placement group."""

    def __init__(self, path: Path):
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self.path.write_text(group.id.hex())


class ReleaseFinishedTrials(Callback):
    """Runs in the sweep's driver: removes a finished trial's placement group if it is still there."""

    def __init__(self, trials_dir: Path):
        self.trials_dir = trials_dir

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._release(trial.trial_id)

    def _release(self, trial_id: str) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        path = self.trials_dir / trial_id / PLACEMENT_GROUP_FILE
        if not path.is_file():
            return
        group = PlacementGroup(PlacementGroupID.from_hex(path.read_text()))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
