"""The wheel a plain `pip install .` builds carries all the code, the built-in templates and the
sandbox schemas."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_templates_and_schemas(tmp_path: Path) -> None:
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("hpcbridge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        p.relative_to(ROOT / "templates").as_posix()
        for p in (ROOT / "templates").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped, "templates/ is empty"
    for rel in shipped:
        assert f"hpcbridge/templates/{rel}" in names
    code = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "hpcbridge").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    # A package missing from pyproject's hand-written list installs without it.
    assert code - names == set()
    assert "hpcbridge/sandbox/schemas/xnat.xsd" in names
    assert "hpcbridge/sandbox/schemas/xdat.xsd" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert re.search(
        r"hpcbridge = hpcbridge\.cli:main", zipfile.ZipFile(wheel).read(entry).decode()
    )


def test_readme_starts_with_the_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert "hpcbridge" in blocks[0] and blocks[0].startswith("pip install")
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "blocks[1]" in ci  # .ci/run runs the README's own test command


def test_readme_first_block_runs(tmp_path: Path) -> None:
    """The newcomer's first commands, as written (the package is already installed here)."""
    block = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    commands = [c for c in block.strip().splitlines() if not c.startswith("pip install")]
    env = {
        "HPCBRIDGE_HOME": str(tmp_path / "home"),
        "PATH": str(Path(sys.executable).parent) + ":" + __import__("os").environ["PATH"],
    }
    try:
        for command in commands:
            done = subprocess.run(
                command, shell=True, capture_output=True, text=True, env=env, timeout=120
            )
            assert done.returncode == 0, (command, done.stderr)
        # the demo says where the NIfTI outputs landed in the sandbox XNAT
        assert re.search(r"Haofei01_MR1/4\s+resource NIFTI: .*Ax_3D_T1_4\.nii\.gz", done.stdout)
    finally:
        subprocess.run(
            "hpcbridge sandbox stop", shell=True, env=env, timeout=60, capture_output=True
        )
