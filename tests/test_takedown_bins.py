"""A takedown reaches the `datasets bin` outputs of a version retired since (issue 20, point
2): a `.bin` holds no ids, so the documents each output holds are recorded beside it (id and
token count, in stream order) and the takedown cuts the documents' tokens out of the files,
nanoGPT's and llm.c's alike; an output that cannot be checked is listed and exits 1."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from booksmith.shards.binexport import export_bin
from booksmith.shards.copies import read_copies, spans_path
from tests.test_shards_dataset import make_version
from tests.test_takedown_copies import bin_text, bin_tokens, found, invoke, last_json


def stream(version: Path, without: set[str] = frozenset()) -> list[int]:  # type: ignore[assignment]
    rows = pq.read_table(version / "tokens" / "smollm2").to_pylist()
    return [t for r in rows if r["id"] not in without for t in r["input_ids"]]


def texts(version: Path, ids: set[str]) -> list[str]:
    return [r["text"] for r in pq.read_table(version / "text").to_pylist() if r["id"] in ids]


@pytest.fixture
def retired(tmp_path: Path) -> tuple[Path, Path, dict[str, list[int]], dict[str, list[str]]]:
    """A version binned both ways, then retired; its streams and texts read before."""
    out = tmp_path / "out"
    version = out / "20261124T020000Z"
    make_version(version, 30, encodings=["smollm2"])
    export_bin(version, tmp_path / "llmc", shard_tokens=500)
    export_bin(version, tmp_path / "nanogpt", fmt="nanogpt")
    gone = {f"{version.name}-00003", f"{version.name}-00004", f"{version.name}-00020"}
    streams = {"all": stream(version), "without": stream(version, gone)}
    assert streams["all"] != streams["without"]
    taken = {"gone": texts(version, gone), "kept": texts(version, {f"{version.name}-00005"})}
    invoke("datasets", "rm", out, version.name, "--yes")
    assert not version.exists()
    return out, tmp_path, streams, taken


def test_bins_of_a_retired_version_have_the_documents_cut_out(retired) -> None:  # type: ignore[no-untyped-def]
    out, root, streams, taken = retired
    name = "20261124T020000Z"
    ids = [f"{name}-00003", f"{name}-00004", f"{name}-00020"]
    assert found(bin_text(root / "llmc"), taken["gone"])  # there before
    before = {p: p.read_bytes() for p in (root / "llmc").iterdir()}
    dry = invoke("datasets", "takedown", out, *ids, "--dry-run")
    assert {c["place"]: c["documents"] for c in last_json(dry)["cuts"]} == {
        str(root / "llmc"): 3, str(root / "nanogpt"): 3}  # fmt: skip
    assert f"bin output of {name} (retired) at {root / 'llmc'}: 3 documents cut out" in dry.stderr
    assert {p: p.read_bytes() for p in (root / "llmc").iterdir()} == before

    result = last_json(invoke("datasets", "takedown", out, *ids, "--yes"))
    assert result["unreached"] == []
    assert sorted(result["rewritten"]) == [f"bin output {root / f}" for f in ("llmc", "nanogpt")]
    for folder in ("llmc", "nanogpt"):
        assert bin_tokens(root / folder) == streams["without"]
        assert found(bin_text(root / folder), taken["gone"]) == []
        assert found(bin_text(root / folder), taken["kept"])
    # llm.c's shards are cut again at 500 tokens, none left over, each header counting its own
    llmc = sorted((root / "llmc").glob("*.bin"))
    assert len(llmc) == -(-len(streams["without"]) // 500)
    (record,) = [c for c in read_copies(out) if c.place == str(root / "llmc")]
    assert record.files == [p.name for p in llmc]
    # the spans follow, so a second takedown cuts from the new files
    assert pq.read_table(spans_path(out, root / "llmc")).num_rows == 27
    again = last_json(invoke("datasets", "takedown", out, f"{name}-00005", "--yes"))
    assert again["unreached"] == [] and len(again["rewritten"]) == 2
    assert found(bin_text(root / "nanogpt"), taken["kept"]) == []
    # an id no bin holds: nothing to cut
    assert last_json(invoke("datasets", "takedown", out, "no-such-id", "--dry-run"))["cuts"] == []


def test_a_bin_that_cannot_be_checked_is_listed_and_exit_1(retired) -> None:  # type: ignore[no-untyped-def]
    out, root, streams, _ = retired
    name = "20261124T020000Z"
    spans_path(out, root / "llmc").unlink()  # as written before the spans were kept
    with open(root / "nanogpt" / "train.bin", "ab") as f:
        f.write(b"\x00\x00")  # one token more than its record says
    failed = invoke("datasets", "takedown", out, f"{name}-00003", "--yes", code=1)
    lines = [x for x in failed.stderr.splitlines() if x.startswith("error: not reached:")]
    assert lines[0] == (
        f"error: not reached: bin output {root / 'llmc'} of {name}, a version no longer under "
        f"{out}: {root / 'llmc'}: its documents were not recorded when it was written (before "
        "booksmith kept them), so it cannot be checked; delete that copy or write it again "
        "from a version"
    )
    assert lines[1].startswith(f"error: not reached: bin output {root / 'nanogpt'}: ")
    assert "do not match the documents recorded for them" in lines[1]
    assert bin_tokens(root / "nanogpt") == streams["all"] + [0]  # untouched
    # a folder that is gone holds nothing: not listed
    for p in (root / "llmc").iterdir():
        p.unlink()
    (root / "llmc").rmdir()
    (root / "nanogpt" / "train.bin").unlink()
    (root / "nanogpt").rmdir()
    assert last_json(invoke("datasets", "takedown", out, f"{name}-00003", "--yes"))[
        "unreached"] == []  # fmt: skip
