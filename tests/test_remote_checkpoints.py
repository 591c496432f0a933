"""A damaged newest checkpoint in a `gs://` output dir: reported, moved to `checkpoints/damaged/`, older one restored.

In-process against the GCS emulator of `tests/test_remote_output.py` (its `gcs` fixture), with a small state
instead of a training run: the same `RunCheckpointer` the trainer uses, writing through orbax/tensorstore's `gcs`
driver, read back and verified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .test_remote_output import BUCKET, gcs  # noqa: F401 - the fixture


class Small(nnx.Module):
    def __init__(self, scale: float):
        self.w = nnx.Param(jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) * scale)


def state(scale: float):
    """The `TrainState` of a 64 x 64 weight trained by Adam, what a `RunCheckpointer` saves."""
    from zhjax.train.state import TrainState

    params = nnx.state(Small(scale))
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=params,
                      opt_state=optax.adam(1e-3).init(nnx.to_pure_dict(params)), rng=jax.random.key(0))


def test_damaged_newest_remote_checkpoint_is_moved_aside_and_the_older_one_restored(gcs, tmp_path):  # noqa: F811
    from zhjax.train.checkpoint import RunCheckpointer

    fs, root = gcs, f"{BUCKET}/run/checkpoints"
    ckpt = RunCheckpointer(f"gs://{root}", max_to_keep=3, async_save=False)
    for step, scale in ((2, 1.0), (4, 2.0)):
        ckpt.save(step, state(scale), {"step": step})
    ckpt.close()

    # 64 flipped bytes in the middle of step 4's largest data object
    data = max((p for p in fs.find(f"{root}/4/trainable") if "/d/" in p), key=fs.size)
    blob = bytearray(fs.cat(data))
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xFF
    fs.pipe(data, bytes(blob))

    reports = []
    ckpt = RunCheckpointer(f"gs://{root}", max_to_keep=3, async_save=False)
    step, restored, meta = ckpt.restore_latest_good(state(0.0), report=reports.append)
    assert step == 2 and meta["step"] == 2 and int(restored.step) == 2
    np.testing.assert_array_equal(np.asarray(restored.trainable["w"][...]), np.asarray(state(1.0).trainable["w"][...]))
    assert len(reports) == 1 and f"checkpoint gs://{root}/4 is damaged" in reports[0], reports
    assert ckpt.all_steps() == [2]
    moved = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/damaged", detail=False) if not p.endswith("README.txt")]
    assert len(moved) == 1 and moved[0].startswith("4-"), moved  # kept, not deleted
    assert fs.find(f"{root}/damaged/{moved[0]}/trainable")
    ckpt.save(4, state(3.0), {"step": 4})  # the run goes on and saves step 4 afresh
    ckpt.close()
    assert RunCheckpointer(f"gs://{root}", max_to_keep=3).all_steps() == [2, 4]


