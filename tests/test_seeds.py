from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from booksmith.generation.seeds import SeedFileError, load_seeds


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_default_seeds_are_real_curriculum_across_subjects() -> None:
    seeds = load_seeds()
    assert len(seeds) >= 60
    subjects = Counter(s.subject for s in seeds)
    for subject in (
        "Mathematics",
        "Physics",
        "Biology",
        "Computer science",
        "History",
        "Economics",
    ):
        assert subjects[subject] >= 3, subject
    assert any("Arts" in (s.subject or "") for s in seeds)
    assert len({s.topic for s in seeds}) == len(seeds), "duplicate topics"


def test_yaml_jsonl_csv_read_the_same_fields(tmp_path: Path) -> None:
    y = write(
        tmp_path,
        "t.yaml",
        "- Photosynthesis\n- {topic: Limits, subject: Math, path: [Math, Calculus], weight: 2}\n",
    )
    j = write(
        tmp_path,
        "t.jsonl",
        '"Photosynthesis"\n\n'
        '{"topic": "Limits", "subject": "Math", "path": "Math > Calculus", "weight": 2}\n',
    )
    c = write(
        tmp_path,
        "t.csv",
        "topic,subject,path,weight\nPhotosynthesis,,,\nLimits,Math,Math > Calculus,2\n",
    )
    for path in (y, j, c):
        seeds = load_seeds(path)
        assert [s.topic for s in seeds] == ["Photosynthesis", "Limits"], path
        assert seeds[1].path == ["Math", "Calculus"] and seeds[1].weight == 2.0
        assert seeds[1].topic_path == ["Math", "Calculus", "Limits"]


@pytest.mark.parametrize(
    ("name", "content", "line", "needle"),
    [
        ("bad.yaml", "topics:\n  - a\n  - b: c: d\n  - e\n", 3, "invalid YAML"),
        ("unclosed.yaml", "- a\n- [b\n- c\n", 4, "at line 2"),
        ("bad.jsonl", '{"topic": "a"}\n{"topic": \n', 2, "invalid JSON"),
        ("missing.jsonl", '{"topic": "a"}\n{"subject": "x"}\n', 2, "missing `topic`"),
        ("missing.yaml", "- a\n- {subject: x}\n", 2, "missing `topic`"),
        ("blank.csv", "topic,subject\na,b\n ,c\n", 3, "missing `topic`"),
        ("tmpl.yaml", "- ok\n- 'Hack {{ config }}'\n", 2, "template syntax"),
        ("tmpl.jsonl", '{"topic": "ok"}\n{"topic": "x {% for a in b %}"}\n', 2, "template syntax"),
        ("nonutf8.yaml", b"- ok\n- caf\xe9\n", 2, "not UTF-8"),
        ("weight.yaml", "- {topic: a, weight: -1}\n", 1, "weight"),
        ("extra.yaml", "- {topic: a, colour: red}\n", 1, "colour"),
    ],
)
def test_malformed_seed_files_name_file_and_line(
    tmp_path: Path, name: str, content: str | bytes, line: int, needle: str
) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(SeedFileError) as err:
        load_seeds(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert needle in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "nothing else may be written"


@pytest.mark.parametrize(("name", "content"), [("e.yaml", ""), ("e.jsonl", "\n\n"), ("e.csv", "")])
def test_empty_seed_file_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(SeedFileError, match=f"{path}: no topics"):
        load_seeds(path)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SeedFileError, match="unknown seed format"):
        load_seeds(write(tmp_path, "t.txt", "a\n"))
    with pytest.raises(SeedFileError, match="not found"):
        load_seeds(tmp_path / "nope.yaml")
