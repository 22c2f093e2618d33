"""The one atomic writer (``qalora/atomic.py``): a file or folder is whole under its final name, or
as it was; and no other module renames files into place by hand."""
import ast
import os
from pathlib import Path

import pytest

from qalora.atomic import atomic_path, write_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("durable", [False, True])
def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path, durable):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_path(final, durable=durable) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".partial-") and not tmp.exists()
        tmp.mkdir()
        (tmp / "model.bin").write_bytes(b"\x01\x02")
        assert (final / "old.txt").read_text() == "old"  # readers still see the old folder
    assert sorted(p.name for p in final.iterdir()) == ["model.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no .partial-/.old- left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    final = write_text(tmp_path / "report.json", '{"a": 1}')
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text('{"a": 2')  # half written
            raise RuntimeError("disk full")
    assert final.read_text() == '{"a": 1}' and os.listdir(tmp_path) == ["report.json"]


def renames(root: Path) -> list[str]:
    """Every call that renames a file into place outside ``qalora/atomic.py``: ``os.replace``,
    ``os.rename``, ``Path.rename``, ``Path.replace(target)`` (one positional argument: ``str.replace``
    takes two) and ``shutil.move``."""
    found = []
    for pkg in ("qalora", "jobs", "storage", "ui"):
        for path in sorted((root / pkg).rglob("*.py")):
            if path.relative_to(root).as_posix() == "qalora/atomic.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                name, owner = node.func.attr, getattr(node.func.value, "id", None)
                if (name in ("rename", "renames") or (name == "replace" and owner == "os")
                        or (name == "replace" and len(node.args) == 1 and not node.keywords)
                        or (name == "move" and owner == "shutil")):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_module_renames_into_place_by_hand():
    """Every temp-then-rename goes through qalora.atomic."""
    assert not renames(ROOT)


def test_the_rename_guard_sees_each_way_to_rename(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "a.py").write_text(
        "import os, shutil\nos.replace(a, b)\np.rename(b)\ntmp.replace(final)\nshutil.move(a, b)\n"
        "s.replace('x', 'y')\nd.replace(tzinfo=None)\n")
    assert renames(tmp_path) == ["jobs/a.py:2", "jobs/a.py:3", "jobs/a.py:4", "jobs/a.py:5"]
