"""The studio page is served by the farm itself: / leads to it, and nothing it loads comes from another host."""

from __future__ import annotations

import re

from tests.farm_harness import Farm

# What makes a browser fetch: HTML src/href, a module's imports, CSS url(...) and @import.
ASSET = re.compile(r"""\s(?:src|href)="([^"]*)"|^import\s[^;]*?\sfrom\s+"([^"]+)";|\bimport\("([^"]+)"\)"""
                   r"""|url\(\s*["']?([^"')\s]+)|@import\s+["']([^"']+)""", re.MULTILINE)


def test_root_leads_to_the_studio(api_only: Farm) -> None:
    with api_only.anonymous() as client:
        root = client.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/studio"


def test_the_studio_loads_nothing_from_other_hosts(api_only: Farm) -> None:
    seen: set[str] = set()
    pending = ["/studio"]
    with api_only.anonymous() as client:
        while pending:
            path = pending.pop()
            seen.add(path)
            resp = client.get(path)
            assert resp.status_code == 200, path
            assert "http://" not in resp.text and "https://" not in resp.text, path
            for match in ASSET.finditer(resp.text):
                ref = next(group for group in match.groups() if group)
                if ref.startswith("data:"):
                    continue
                assert not ref.startswith("//"), f"{path} loads {ref} from another host"
                target = ref if ref.startswith("/") else "/studio/static/" + ref.removeprefix("./")
                if target not in seen:
                    pending.append(target)
        shell = client.get("/studio")
    # The page itself, every module it imports and the stylesheet, all from /studio/static.
    assert {"/studio/static/studio.js", "/studio/static/lib.js", "/studio/static/dictionary.js",
            "/studio/static/gallery.js", "/studio/static/infotext.js", "/studio/static/studio.css"} <= seen
    policy = shell.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
