"""The run's key sets (generation/sorted_keys.py, pipeline/first_ids.py): the same answers
as a dict, in 16 bytes a key."""

from __future__ import annotations

import random
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np

from booksmith.generation.sorted_keys import Repeats, SortedKeys
from booksmith.pipeline.first_ids import FirstIds


def test_find_and_contains_agree_with_a_dict() -> None:
    rng = random.Random(3)
    keys, oracle = SortedKeys(), {}
    for chunk in range(30):
        new = [rng.getrandbits(64) for _ in range(rng.randrange(0, 200))]
        new = [k for k in dict.fromkeys(new) if k not in oracle]
        base = len(oracle)
        keys.add(np.array(new, dtype=np.uint64), np.arange(base, base + len(new)))
        oracle.update((k, base + i) for i, k in enumerate(new))
        probe = [*rng.sample(sorted(oracle), min(50, len(oracle))), 0, 2**64 - 1, *new[:3]]
        probe += [rng.getrandbits(64) for _ in range(50)]
        got = keys.find(np.array(probe, dtype=np.uint64)).tolist()
        assert got == [oracle.get(k, -1) for k in probe], chunk
        assert [k in keys for k in probe] == [k in oracle for k in probe]
    assert len(keys) == len(oracle)


def test_first_ids_survive_a_truncate_as_a_resumed_run_needs(tmp_path: Path) -> None:
    seen = FirstIds(tmp_path / "exact.bin")
    seen.add([(5, "a" * 32), (2**63 + 7, "b" * 32)])
    seen.add([(9, "c" * 64)])
    assert seen.ids(np.array([9, 5, 1, 2**63 + 7], dtype=np.uint64)) == [
        "c" * 64, "a" * 32, None, "b" * 32,
    ]  # fmt: skip
    seen.truncate(2)  # the checkpoint held two rows: the third belonged to a killed chunk
    again = FirstIds(tmp_path / "exact.bin")  # a resumed run opens the file anew
    again.truncate(2)
    for ids in (seen, again):
        assert ids.rows == 2
        assert ids.ids(np.array([9, 5], dtype=np.uint64)) == [None, "a" * 32]
    assert (tmp_path / "exact.bin").stat().st_size == 2 * 72


def test_a_key_costs_no_python_object(tmp_path: Path) -> None:
    """What the module is for: a run's memory does not grow by a Python object per key."""
    seen = FirstIds(tmp_path / "exact.bin")
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            keys = rng.integers(0, 2**63, 2_000, dtype=np.uint64)
            seen.add([(int(k), f"{int(k):032x}") for k in keys])
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert seen.rows == 100_000
    assert held / seen.rows < 40, f"{held / seen.rows:.0f} bytes a key"


def test_repeats_number_each_key_as_a_counter_does() -> None:
    """A plan numbers the repeats of a prompt 0, 1, 2, ...: the same across the merges."""
    rng = random.Random(5)
    repeats, oracle = Repeats(), Counter[int]()
    repeats.FLUSH = 64  # merge often
    pool = [rng.getrandbits(64) for _ in range(300)]
    for _ in range(5_000):
        key = rng.choice(pool) if rng.random() < 0.7 else rng.getrandbits(64)
        assert repeats.next(key) == oracle[key]
        oracle[key] += 1
    assert len(repeats.old) + len(repeats.new) == len(oracle)
