"""pipelines/train/failures.py: bad input found by a worker ends the run; a lost worker is retried.

No cluster: the callback is fed the exceptions Ray Train's controller hands it (its own wrapper
types), and Ray's default failure policy is asked what it does with the result. The whole path on
the simulated cluster: tests/faults/test_training_faults.py::test_bad_shard_found_by_a_worker_stops_the_run_after_one_attempt.
"""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("ray.train.v2")

from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision  # noqa: E402
from ray.train.v2._internal.util import construct_user_exception_with_traceback  # noqa: E402
from ray.train.v2.api.config import FailureConfig  # noqa: E402
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError  # noqa: E402

import torch  # noqa: E402

from ddpm.checkpoint import CheckpointError  # noqa: E402
from ddpm.config import ConfigError  # noqa: E402
from ddpm.data.storage import DataError  # noqa: E402
from pipelines.train.failures import StopOnBadInput, WorkerInputError, worker_input_error  # noqa: E402
from pipelines.train.loop import NonFiniteLossError  # noqa: E402


def wrapped(e: BaseException):
    """What the controller sees for an exception raised in a worker's training function."""
    try:
        raise e
    except BaseException as raised:
        return construct_user_exception_with_traceback(raised)


@pytest.mark.parametrize("error,code", [(DataError("shard train-000001.tar: sha256 does not match the manifest"), 2),
                                        (ConfigError("train.batch_size=16 must divide by workers"), 2),
                                        (NonFiniteLossError("5 non-finite losses in a row"), 1),
                                        (CheckpointError("checkpoint s3://b/run/checkpoint_00000400: not a readable "
                                                         "checkpoint (EOFError)"), 1),
                                        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1),
                                        (MemoryError(), 1)])
def test_a_workers_bad_input_becomes_an_error_ray_does_not_retry(error, code):
    exceptions = {0: wrapped(RuntimeError("gloo: connection closed by peer")), 1: wrapped(error)}
    with pytest.raises(WorkerInputError) as info:
        StopOnBadInput().after_exception(None, exceptions)
    assert info.value.exit_code == code and str(info.value).startswith(f"worker 1: {str(error) or 'MemoryError'}")
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        assert "lower train.batch_size" in str(info.value)
    if isinstance(error, CheckpointError):
        assert "remove that checkpoint folder" in str(info.value)
    # The controller wraps what a callback raises in a ControllerError: the default policy raises it
    # at once, where a worker-group error is retried (max_failures=3).
    policy = DefaultFailurePolicy(FailureConfig(max_failures=3))
    failed = ControllerError(info.value)
    assert policy.make_decision(failed) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("worker died", exceptions)) == FailureDecision.RETRY
    # The driver gets the ControllerError back through Ray's object store and finds the cause.
    found = worker_input_error(pickle.loads(pickle.dumps(failed)))
    assert found is not None and found.exit_code == code and str(found) == str(info.value)


def test_a_lost_or_crashed_worker_is_left_to_ray_to_retry():
    StopOnBadInput().after_exception(None, {0: wrapped(RuntimeError("CUDA error: an illegal memory access")),
                                            1: wrapped(ConnectionError("peer closed"))})
    assert worker_input_error(WorkerGroupError("worker died", {0: RuntimeError("x")})) is None


def test_an_unreadable_checkpoint_is_named_by_its_place_in_the_runs_storage(tmp_path):
    """Ray hands the worker a local copy of the checkpoint; the error names the stored one."""
    import ray.train

    from pipelines.train.ray_train import CHECKPOINT_FILE, checkpoint_io

    stored = tmp_path / "storage" / "run" / "checkpoint_00000400"
    stored.mkdir(parents=True)
    (stored / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    restore, _ = checkpoint_io(lambda *a, **k: None, lambda: ray.train.Checkpoint.from_directory(str(stored)),
                               ray.train.Checkpoint)
    with pytest.raises(CheckpointError, match=f"checkpoint {stored}: ./checkpoint.pt: refused") as info:
        restore()
    with pytest.raises(WorkerInputError, match="not retried.*remove that checkpoint folder"):
        StopOnBadInput().after_exception(None, {0: wrapped(info.value)})
