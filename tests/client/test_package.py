"""The client is a package of its own: it depends on httpx only, and the extras are only needed by what uses them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.farm_harness import ROOT

pytestmark = pytest.mark.unit

WITHOUT_EXTRAS = "import sys; sys.modules['rich'] = None; sys.modules['standardwebhooks'] = None\n"


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS + code], capture_output=True, text=True,
                          timeout=60, cwd="/")


def test_wheel_requires_httpx_and_names_its_extras(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT / "clients" / "python")], check=True, timeout=300)
    wheel = next(tmp_path.glob("renderfarm_client-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith("METADATA"))).decode())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    requires = metadata.get_all("Requires-Dist") or []
    assert [r for r in requires if "extra ==" not in r] == ["httpx>=0.27"]
    assert sorted(metadata.get_all("Provides-Extra") or []) == ["cli", "webhooks"]
    assert "renderfarm = renderfarm_client.cli:main" in entry_points
    assert "renderfarm_client/py.typed" in names and not any(n.startswith(("api/", "shared/")) for n in names)


def test_the_client_imports_and_works_without_the_extras() -> None:
    done = python("import renderfarm_client as rc\n"
                  "c = rc.Client('http://127.0.0.1:9', 'k'); c.close()\n"
                  "try:\n    rc.verify_webhook(b'{}', {}, 'whsec_MA==')\n"
                  "except rc.RenderfarmError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert "pip install 'renderfarm-client[webhooks]'" in done.stdout


def test_the_cli_without_rich_says_which_extra_to_install() -> None:
    done = python("from renderfarm_client.cli import main; sys.exit(main(['jobs']))")
    assert done.returncode == 2
    assert "pip install 'renderfarm-client[cli]'" in done.stderr


def test_the_async_client_mirrors_the_sync_one() -> None:
    import inspect

    from renderfarm_client import AsyncClient, Client

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {name: inspect.signature(member) for name, member in vars(cls).items()
                if callable(member) and not name.startswith("_") and name not in ("close", "aclose")}

    sync, async_ = public(Client), public(AsyncClient)
    assert sync.keys() == async_.keys() and "wait" in sync and "download_images" in sync
    for name, signature in sync.items():
        assert list(signature.parameters) == list(async_[name].parameters), name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)) != (name == "verify_webhook"), name
