"""Training in a torch process group of 2 processes equals one process.

Runs in the `tests-multidevice` nox session: `torchrun` starts 2 processes on
127.0.0.1 (gloo), each trains every case of `process_group_training.py` from its
own seed and saves its weights and losses; here each case is trained again in
this process, from rank 0's seed, and compared. Every other session skips this
file, saying why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import process_group_training as group
from testing import doc_blocks

PROCESSES = 2


def _skip_reason() -> str | None:
    if keras.backend.backend() != "torch":
        return "torch.distributed runs on torch only (the tests-multidevice session)"
    if not os.environ.get("TWO_TOWER_MULTIDEVICE"):
        return "starts a process group of 2 processes: run the tests-multidevice session"
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _torchrun(script: Path, *arguments: str, cwd: Path | None = None) -> None:
    """`script` run by `PROCESSES` processes of one process group on 127.0.0.1."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={PROCESSES}", "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(script), *arguments,
    ]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(group.__file__).parent), *sys.path])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The folder of every case's `<case>.<rank>.npz`, trained by the group."""
    out = tmp_path_factory.mktemp("process_group")
    _torchrun(Path(group.__file__), str(out))
    return out


def _weights(saved: np.lib.npyio.NpzFile, prefix: str) -> list[np.ndarray]:
    count = sum(name.startswith(prefix) for name in saved.files)
    return [saved[f"{prefix}{i}"] for i in range(count)]


@pytest.mark.parametrize("case", group.cases())
def test_two_processes_train_like_one(trained, case):
    keras.utils.set_random_seed(group.SEED)  # rank 0's
    single, logs = group.train(case)
    ranks = [np.load(trained / f"{case}.{rank}.npz") for rank in range(PROCESSES)]
    # Each rank started from its own seed; the first step took rank 0's weights.
    first, second = (_weights(saved, "initial_") for saved in ranks)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    final = [_weights(saved, "weight_") for saved in ranks]
    for mine, theirs in zip(final[1], final[0], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    expected = single.get_weights()
    assert len(final[0]) == len(expected)
    assert any(not np.allclose(a, b) for a, b in zip(final[0], first, strict=True))  # trained
    for saved in ranks:
        np.testing.assert_allclose(saved["losses"], logs["losses"], atol=1e-5, rtol=0)
    for mine, theirs in zip(final[0], expected, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


def test_arrays_on_keras_own_adapter_are_refused(trained):
    for rank in range(PROCESSES):
        message = (trained / f"refused.{rank}.txt").read_text()
        assert "process group of 2 processes" in message and "validation_split" in message


def test_processes_that_disagree_on_the_arrays_fail_together(trained):
    for rank in range(PROCESSES):
        message = (trained / f"disagree.{rank}.txt").read_text()
        assert "rank 0: {'rows': 64, 'batch_size': 64, 'shuffle': 1}" in message
        assert "rank 1: {'rows': 70," in message


def test_distributed_guide_runs_under_torchrun(tmp_path):
    (block,) = doc_blocks(
        "docs/distributed.md",
        "test_multidevice_torch.py::test_distributed_guide_runs_under_torchrun",
    )
    data = "\n".join([
        "from testing import interactions, pairs_for",
        "x = pairs_for('full_softmax', interactions(8192, 40, 64)[0])  # from_ids' default loss",
        "num_users, num_items = 40, 64",
    ])  # fmt: skip
    after = "\n".join([
        "import numpy as np",
        "rank = os.environ['RANK']  # torchrun's",
        "np.savez(f'weights.{rank}.npz', *model.get_weights(), loss=model.history.history['loss'])",
    ])  # fmt: skip
    (tmp_path / "train.py").write_text("\n".join([data, block, after]))
    _torchrun(tmp_path / "train.py", cwd=tmp_path)
    first, second = (np.load(tmp_path / f"weights.{rank}.npz") for rank in range(PROCESSES))
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
    losses = first["loss"]
    assert len(losses) == 10 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert (tmp_path / "model.keras").is_file()


def test_local_negatives_are_each_process_own_with_log_q_scaled_to_its_share(trained):
    # cross_replica_negatives=False: each process's 16 rows against its own 16
    # candidates, whose probabilities are per global batch: log q + log(16 / 32),
    # beside 3 sampled negatives (item 5, drawn with p = 1: log 3).
    x, (users, items) = group.local_negatives_batch(PROCESSES)
    queries, candidates = users[x["query"]], items[x["candidate"]]
    log_q = np.log(x["candidate_sampling_probability"].astype("float64"))
    expected = []
    for rank in range(PROCESSES):
        rows = slice(16 * rank, 16 * (rank + 1))
        columns = np.concatenate([candidates[rows], np.repeat(items[[5]], 3, axis=0)])
        correction = np.concatenate([log_q[rows] + np.log(16 / 32), np.full(3, np.log(3))])
        logits = queries[rows] @ columns.T - correction[None, :]
        top = logits.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        expected.append(np.mean(log_sum - np.diag(logits)))
    for rank in range(PROCESSES):
        loss = float((trained / f"local_negatives.{rank}.txt").read_text())
        np.testing.assert_allclose(loss, np.mean(expected), atol=1e-5, rtol=0)
