"""Every code block of README.md runs as written, offline, or says why not.

A ```python or ```bash block runs unless its first line is `# needs: <what>` (the Hub, a GPU, data the
reader brings, more than 60 s); it is then skipped with that reason. A block whose first line is
`# continues the block above` runs in the namespace the previous Python block left (the reader runs
them in order); every other Python block runs in a fresh namespace, so it cannot lean on names it does
not define. Blocks run in an empty working folder. Other fences (```text: output, trees) are not code.
Budget: about 90 s on 2 cores (GILL-tiny loads twice; its calls run at the world's 32 px).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS, CONTINUES = "# needs:", "# continues the block above"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[dict]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        language, source = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        first = source.lstrip().splitlines()[0] if source.strip() else ""
        blocks.append({"language": language, "source": source, "line": line,
                       "needs": first[len(NEEDS):].strip() if first.startswith(NEEDS) else None,
                       "continues": first.startswith(CONTINUES)})
    return blocks


def test_every_block_is_tagged_and_every_skip_gives_its_reason():
    blocks = readme_blocks()
    assert blocks, "README.md has no code blocks"
    for block in blocks:
        assert block["language"] in ("python", "bash", "text"), f"README.md:{block['line']}: tag the fence (python, bash or text)"
        if block["needs"] is not None:
            assert block["needs"], f"README.md:{block['line']}: `# needs:` without a reason"
    runnable = [b for b in blocks if b["language"] in ("python", "bash") and b["needs"] is None]
    assert len(runnable) >= 8, "the README's runnable examples went missing"
    first_python = next(b for b in blocks if b["language"] == "python")
    assert first_python["needs"] is None and "load_gill_tiny_pipeline" in first_python["source"]  # the quick start


RUNNER = textwrap.dedent("""
    import json, sys, time, traceback
    blocks = json.load(open(sys.argv[1]))
    namespace = None
    for block in blocks:
        if not block["continues"] or namespace is None:
            namespace = {"__name__": "__main__"}
        start = time.time()
        try:
            exec(compile(block["source"], f"README.md:{block['line']}", "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED README.md:{block['line']}", flush=True)
            sys.exit(1)
        print(f"ran README.md:{block['line']} in {time.time() - start:.1f} s", flush=True)
""")


def environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's gill-hf
    return env


def test_python_blocks_run(tmp_path):
    blocks = [b for b in readme_blocks() if b["language"] == "python" and b["needs"] is None]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    (tmp_path / "runner.py").write_text(RUNNER)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")], cwd=work,
                            env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("ran README.md:") == len(blocks)


@pytest.mark.parametrize("block", [b for b in readme_blocks() if b["language"] == "bash" and b["needs"] is None],
                         ids=lambda b: f"README.md:{b['line']}")
def test_bash_blocks_run(block, tmp_path):
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block["source"]], cwd=tmp_path, env=environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README.md:{block['line']}\n" + result.stdout[-2000:] + result.stderr[-4000:]
