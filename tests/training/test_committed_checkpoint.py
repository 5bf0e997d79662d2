"""resume's second source: a checkpoint that Ray persisted but never registered (its
controller registers one only at its next poll of every rank; a host lost in between left
Ray's latest checkpoint behind, tests/cluster/test_faults.py). history.json, which rank 0
writes only after the checkpoint is persisted, vouches for it."""

from __future__ import annotations

from brainmri.core.storage import open_location
from brainmri.models.checkpoints import CKPT_FILE, dump_state
from brainmri.training.train import checkpoint_dir, committed_checkpoint


def run_folder(tmp_path, epochs: int, folders=None):
    run = open_location(str(tmp_path / "runs" / "r"))
    (run / "history.json").write_json([{"epoch": e} for e in range(epochs)])
    for e in range(epochs) if folders is None else folders:
        (run / checkpoint_dir(e) / CKPT_FILE).write_bytes(dump_state({"epoch": e, "model": {}}))
    return run


def test_the_last_epoch_in_history_wins_over_an_older_ray_checkpoint(tmp_path):
    run = run_folder(tmp_path, 3)
    assert checkpoint_dir(2) == "checkpoint_000002"
    assert committed_checkpoint(run.uri, after=1)["epoch"] == 2
    assert committed_checkpoint(run.uri, after=-1)["epoch"] == 2  # Ray registered none


def test_nothing_newer_than_ray_s_or_nothing_to_vouch_for_leaves_ray_s(tmp_path):
    run = run_folder(tmp_path, 3)
    assert committed_checkpoint(run.uri, after=2) is None
    assert committed_checkpoint(None, after=-1) is None
    assert committed_checkpoint(str(tmp_path / "runs" / "none"), after=-1) is None
    # a run from before epoch-named folders: Ray's timestamped ones are Ray's to choose
    old = run_folder(tmp_path / "old", 2, folders=[])
    assert committed_checkpoint(old.uri, after=-1) is None


def test_an_epoch_is_recorded_only_when_its_whole_checkpoint_is_in_storage(tmp_path):
    """verify_persisted, before rank 0 writes history.json: pyarrow's copy_files (Ray's
    upload) swallows a failed upload, and Ray registers the checkpoint anyway."""
    import pytest

    from brainmri.core.storage import StorageError
    from brainmri.training.train import verify_persisted

    run = run_folder(tmp_path, 2)
    size = len((run / checkpoint_dir(1) / CKPT_FILE).read_bytes())
    verify_persisted(run.uri, 1, size)  # there, whole: no error
    with pytest.raises(StorageError, match=rf"epoch 1 did not reach .* whole \({size} bytes, not"):
        verify_persisted(run.uri, 1, size + 1)
    with pytest.raises(StorageError, match=r"checkpoint of epoch 2 did not reach .* \(missing\)"):
        verify_persisted(run.uri, 2, size)
