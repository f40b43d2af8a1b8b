"""shards/fs.open_parquet: a local Parquet file is read by Arrow itself, never through a Python
file object (an Arrow thread still reading one at interpreter exit aborts the process:
apache/arrow#34314); a remote one through one fsspec file, closed after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from booksmith.shards.fs import open_parquet

TABLE = pa.table({"id": [f"d{i}" for i in range(1000)], "n": list(range(1000))})


def test_a_local_file_is_read_without_a_python_file_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(TABLE, path, row_group_size=100)

    def no_python_files(self: Any, *args: Any, **kw: Any) -> Any:
        raise AssertionError("a local Parquet file was opened as a Python file object")

    monkeypatch.setattr(LocalFileSystem, "open", no_python_files)
    monkeypatch.setattr(LocalFileSystem, "_open", no_python_files)
    with open_parquet(LocalFileSystem(), str(path)) as parquet:
        assert parquet.metadata.num_row_groups == 10
        assert parquet.read(columns=["id"]).column("id").to_pylist() == TABLE["id"].to_pylist()
        assert parquet.read_row_group(3, columns=["n"])["n"].to_pylist() == list(range(300, 400))


def test_a_remote_file_is_read_through_fsspec_and_closed() -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/bucket/t.parquet", "wb") as f:
        pq.write_table(TABLE, f, row_group_size=100)
    opened: list[Any] = []
    real_open = fs.open

    def spy(path: str, mode: str = "rb", **kw: Any) -> Any:
        f = real_open(path, mode, **kw)
        real_close = f.close
        f.close = lambda: (opened.append("closed"), real_close())[1]
        opened.append(path)
        return f

    fs.open = spy  # type: ignore[method-assign]
    with open_parquet(fs, "/bucket/t.parquet") as parquet:
        first = next(parquet.iter_batches(5, columns=["id"])).to_pylist()
    assert first == [{"id": f"d{i}"} for i in range(5)]
    assert opened == ["/bucket/t.parquet", "closed"]
