"""The loader: seeded order, host slices, exact resumption, prefetch, buckets, global arrays on a mesh."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest

from zhjax.data.loader import DataLoader, default_bucket_lengths

REPO = Path(__file__).resolve().parents[1]


def fixed_rows(n: int, length: int = 8, with_labels: bool = False) -> datasets.Dataset:
    """Row i holds tokens i*length .. (i+1)*length-1, so every token says which row it came from."""
    ids = np.arange(n * length, dtype=np.int32).reshape(n, length)
    fixed = datasets.List(datasets.Value("int32"), length=length)
    cols = {"input_ids": ids, "segment_ids": np.repeat(np.arange(n, dtype=np.int32) % 3 + 1, length).reshape(n, length)}
    if with_labels:
        cols["labels"] = -ids
    table = pa.table({k: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), length) for k, v in cols.items()})
    return datasets.Dataset(table).cast(datasets.Features({k: fixed for k in cols}))


def row_ids(batch, length: int = 8) -> list[int]:
    """Dataset row of each batch row, -1 for an empty (padding) row."""
    ids = np.asarray(batch["input_ids"])
    return [int(r[0]) // length if s[0] > 0 else -1 for r, s in zip(ids, np.asarray(batch["segment_ids"]), strict=True)]


def take(it, n):
    return list(itertools.islice(it, n))


def test_order_is_a_seeded_permutation_per_epoch_and_every_row_comes_once(tmp_path):
    ds = fixed_rows(50)
    loader = DataLoader(ds, 8, seed=1, num_epochs=2)
    batches = list(loader.local_batches())
    assert len(loader) == 7 and len(batches) == 14  # 50 rows: the 7th batch is filled with 6 empty rows
    epochs = [sum((row_ids(b) for b in batches[i * 7:(i + 1) * 7]), []) for i in range(2)]
    for seen in epochs:
        assert sorted(r for r in seen if r >= 0) == list(range(50)) and seen.count(-1) == 6
    assert epochs[0] != epochs[1]
    again = sum((row_ids(b) for b in DataLoader(ds, 8, seed=1, num_epochs=1).local_batches()), [])
    other = sum((row_ids(b) for b in DataLoader(ds, 8, seed=2, num_epochs=1).local_batches()), [])
    assert again == epochs[0] != other
    assert len(DataLoader(ds, 8, drop_remainder=True)) == 6


def test_blocks_get_labels_from_inputs_and_positions_through_the_row():
    batch = next(iter(DataLoader(fixed_rows(16), 4)))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    assert all(v.dtype == np.int32 and v.shape == (4, 8) for v in batch.values())
    np.testing.assert_array_equal(batch["labels"], batch["input_ids"])
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(8), (4, 1)))
    np.testing.assert_array_equal(batch["segment_ids"][:, 0], np.asarray(row_ids(batch)) % 3 + 1)
    padded = list(DataLoader(fixed_rows(5, with_labels=True), 4, num_epochs=1, pad_id=7))[-1]
    empty = padded["segment_ids"][:, 0] == 0
    assert empty.sum() == 3 and (padded["input_ids"][empty] == 7).all() and (padded["labels"][empty] == -100).all()
    assert (padded["labels"][~empty] == -padded["input_ids"][~empty]).all()


def test_two_simulated_hosts_together_see_each_sample_once_per_epoch():
    ds = fixed_rows(37)
    hosts = [DataLoader(ds, 8, seed=5, num_epochs=2, process_index=i, process_count=2) for i in range(2)]
    single = list(DataLoader(ds, 8, seed=5, num_epochs=2).local_batches())
    per_host = [list(h.local_batches()) for h in hosts]
    assert len(per_host[0]) == len(per_host[1]) == len(single) == 10
    for b, (a, c) in enumerate(zip(*per_host, strict=True)):
        assert a["input_ids"].shape == (4, 8)
        assert row_ids(a) + row_ids(c) == row_ids(single[b])  # host 0 has the first half of the global batch
    for epoch in range(2):
        seen = [r for h in per_host for b in h[epoch * 5:(epoch + 1) * 5] for r in row_ids(b) if r >= 0]
        assert sorted(seen) == list(range(37))


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_from_state_continues_at_the_exact_next_sample(prefetch):
    ds = fixed_rows(30)
    run = DataLoader(ds, 4, seed=9, prefetch=prefetch)
    it = iter(run.local_batches())
    head = take(it, 5)
    state = run.state_dict()  # taken mid-run, while the prefetch thread has read ahead
    assert state == {"epoch": 0, "position": 20}
    rest = take(it, 12)  # crosses into epoch 1 (8 batches per epoch)
    assert run.state_dict() == {"epoch": 2, "position": 4 * 1}
    resumed = DataLoader(ds, 4, seed=9, prefetch=prefetch)
    resumed.load_state_dict(state)
    again = take(resumed.local_batches(), 12)
    for a, b in zip(rest, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    fresh = take(DataLoader(ds, 4, seed=9).local_batches(), 5)
    assert [row_ids(b) for b in fresh] == [row_ids(b) for b in head]


def test_breaking_out_of_a_prefetching_loop_stops_its_thread():
    loader = DataLoader(fixed_rows(100), 4, prefetch=2)
    for i, _ in enumerate(loader.local_batches()):
        if i == 3:
            break
    assert loader.state_dict() == {"epoch": 0, "position": 16}
    import threading

    assert not any(t.name == "zhjax-data-prefetch" and t.is_alive() for t in threading.enumerate())
    assert row_ids(next(iter(loader.local_batches()))) == row_ids(take(DataLoader(fixed_rows(100), 4).local_batches(), 5)[4])


def test_buckets_pad_examples_to_a_few_static_lengths_and_keep_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=61)
    ids = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(lengths)]
    ds = datasets.Dataset.from_dict({"input_ids": ids, "labels": [[-100] + x[1:] for x in ids]})
    assert default_bucket_lengths(100, 16) == (16, 32, 64, 100)
    loader = DataLoader(ds, 4, bucket_lengths=(16, 32, 64, 100), num_epochs=1, seed=3)
    seen = []
    for batch in loader.local_batches():
        width = batch["input_ids"].shape[1]
        assert width in (16, 32, 64, 100)
        for r in range(4):
            n = int((batch["segment_ids"][r] > 0).sum())
            if n:
                i = int(batch["input_ids"][r, 0]) // 1000
                seen.append(i)
                assert n == lengths[i] and width == min(b for b in (16, 32, 64, 100) if b >= n)
                np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
                assert batch["labels"][r, 0] == -100 and (batch["labels"][r, n:] == -100).all()
    assert sorted(seen) == list(range(61))
    with pytest.raises(ValueError, match="need bucket_lengths"):
        DataLoader(ds, 4)
    with pytest.raises(ValueError, match="largest bucket"):
        DataLoader(ds, 4, bucket_lengths=(16, 32))


def test_bad_settings_are_reported():
    with pytest.raises(ValueError, match="not divisible by 2 hosts"):
        DataLoader(fixed_rows(8), 3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="does not start a batch"):
        DataLoader(datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]}), 2,
                   bucket_lengths=(4,)).load_state_dict({"epoch": 0, "position": 1})


MESH_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import AxisType, PartitionSpec as P
    from tests.test_data_loader import fixed_rows
    from zhjax.data.loader import DataLoader

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    ds = fixed_rows(40)
    loader = DataLoader(ds, 16, seed=4, mesh=mesh)
    local = DataLoader(ds, 16, seed=4)
    for batch, ref in zip(loader, local.local_batches()):
        for k, v in batch.items():
            assert isinstance(v, jax.Array) and v.shape == (16, 8), (k, v.shape)
            assert v.sharding.spec == P(("data", "fsdp")), v.sharding
            assert {s.data.shape for s in v.addressable_shards} == {(2, 8)}
            np.testing.assert_array_equal(np.asarray(v), ref[k])
        if loader.state_dict()["epoch"] == 1:
            break
    try:
        DataLoader(ds, 12, mesh=mesh)
    except ValueError as e:
        assert "not divisible by the 8 batch shards" in str(e)
    else:
        raise AssertionError("a batch of 12 over 8 shards was accepted")
    print("OK")
""")


def test_global_batches_are_sharded_over_data_and_fsdp_on_a_2x4_mesh():
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from jax.sharding import AxisType
    pid, port, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from tests.test_data_helpers import make_tokenizer, write_text
    from zhjax.data.loader import DataLoader
    from zhjax.data.pretrain import build_blocks_with_summary

    tok = make_tokenizer()
    ds, summary = build_blocks_with_summary(f"{tmp}/corpus", tok, 8, cache_dir=f"{tmp}/cache")
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    loader = DataLoader(ds, 16, seed=2, mesh=mesh, num_epochs=1)
    reference = DataLoader(ds, 16, seed=2, num_epochs=1, process_index=0, process_count=1)
    rows = 0
    for batch, ref in zip(loader, reference.local_batches(), strict=True):
        for k, v in batch.items():
            assert v.shape == (16, 8)
            for shard in v.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), ref[k][shard.index])
                rows += shard.data.shape[0] if k == "input_ids" else 0
    print("OK", pid, summary.tokenized_files, rows)
""")


def test_two_jax_processes_build_blocks_together_and_read_disjoint_halves_of_each_global_batch(tmp_path):
    import socket

    from tests.test_data_helpers import write_text

    for i in range(4):
        write_text(tmp_path / "corpus" / f"{i}.txt", [f"第{j}行 fox jumps {i}" for j in range(40 + 10 * i)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, str(i), str(port), str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [out.split()[-4:] for out, _ in outs]
    assert [r[0] for r in results] == ["OK", "OK"]
    assert sum(int(r[2]) for r in results) == 4  # each process tokenized its own files
    assert int(results[0][3]) == int(results[1][3]) > 0  # and read half of every global batch
