"""Every shell command in the README and docs/ runs as written, or says why CI skips it.

A command is a line of a ```bash block. One whose trailing comment starts with ``long:``, ``GPU:`` or
``needs:`` (minutes of work, a GPU, or a model folder / file the reader brings) is only checked for that tag;
every other command runs from the repository root on the CPU within a minute and must exit 0.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"#\s*(long|GPU|needs):")


def commands() -> list[tuple[str, str]]:
    found = []
    for path in ["README.md"] + sorted(glob.glob(os.path.join("docs", "*.md"), root_dir=ROOT)):
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    found.append((path, line.strip()))
    return found


def test_commands_are_found():
    cmds = commands()
    assert len(cmds) > 20 and any(p == "README.md" for p, _ in cmds) and any(p.startswith("docs") for p, _ in cmds)


RUN = [(p, c) for p, c in commands() if not SKIP.search(c)]


@pytest.mark.parametrize("path,command", RUN, ids=[f"{p}:{c[:40]}" for p, c in RUN])
def test_cpu_command_runs_as_written(path, command):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("TRITON_INTERPRET", None)  # as a reader would run it
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{path}: {command}\n{out.stderr[-2000:]}"
