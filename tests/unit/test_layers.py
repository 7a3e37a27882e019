"""The gateway stays thin: importing it never pulls in torch, diffusers or worker code."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.farm_harness import ROOT


def test_api_does_not_import_torch_diffusers_or_worker() -> None:
    code = (
        "import json, sys, api.main; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'worker'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_shared_package_has_no_torch_imports() -> None:
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        text = path.read_text()
        if "import torch" in text or "import diffusers" in text or "from worker" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
