"""The README's Batch API example runs as written (only its URL, key and model are this test's)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

from tests.batch.conftest import MODEL, BatchStack, runner

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- batch-example:[^>]*-->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


async def test_the_readme_batch_example_runs(batch_stack: BatchStack) -> None:
    match = _BLOCK.search(README.read_text())
    assert match, "README.md lost its batch example"
    key = await batch_stack.tenant("batch-readme")
    code = (match.group(1).replace("http://127.0.0.1:8080/v1", batch_stack.base_url)
            .replace('"hpg_..."', repr(key)).replace('"model": "demo"', f'"model": "{MODEL}"'))
    out = io.StringIO()

    def run() -> None:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})

    async with runner(batch_stack):
        await asyncio.wait_for(asyncio.to_thread(run), 60)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("completed ") and "completed=3" in printed[0], printed
    assert [p.split()[0] for p in printed[1:]] == [f"abstract-{i}" for i in range(3)]
