"""The event path's direction, as docs/ARCHITECTURE.md states it: the stages (`sources/`, `filters/`, `log/`,
`fanout/`, `sinks/`) meet only through the records of `gateway/event.py`, the wire format of `gateway/envelope.py`
and the callables `runtime.py` hands them; none imports another. Read from the source, so a new import that
crosses a stage fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
STAGES = ("sources", "filters", "log", "fanout", "sinks")
# What every stage may use besides its own package: the shared records and formats, the one backoff and the one
# token bucket, the config's types, the broker connection, and the counters it reports into.
SHARED = ("gateway.event", "gateway.envelope", "gateway.config", "gateway.backoff", "gateway.ratelimit",
          "gateway.mqtt", "gateway.ops.metrics")


def gateway_imports(path: Path) -> set[str]:
    """The gateway.* modules a file imports, wherever in it (a function-level import counts too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gateway"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("gateway"):
            found.add(node.module)
            # `from gateway.fanout import feeds` imports the module gateway.fanout.feeds
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (GATEWAY.parent / node.module.replace(".", "/") / f"{a.name}.py").exists())
    return found


def within(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_itself_and_what_is_shared(stage):
    crossing = {f"{path.relative_to(GATEWAY.parent)}: {module}"
                for path in sorted((GATEWAY / stage).rglob("*.py"))
                for module in gateway_imports(path)
                if not within(module, (*SHARED, f"gateway.{stage}")) and module != "gateway"}
    assert not crossing, f"stage {stage} imports another stage or a part it should not see: {sorted(crossing)}"


def test_the_broker_connection_and_the_shared_records_import_no_stage():
    files = [*sorted((GATEWAY / "mqtt").rglob("*.py")), *(GATEWAY / f"{name}.py" for name in (
        "event", "envelope", "config", "backoff", "ratelimit"))]
    crossing = {f"{path.relative_to(GATEWAY.parent)}: {module}" for path in files
                for module in gateway_imports(path) if within(module, tuple(f"gateway.{s}" for s in STAGES))}
    assert not crossing, sorted(crossing)


def test_the_check_sees_a_crossing_import(tmp_path):
    """The rule itself: an import of another stage, at module level or inside a function, is found."""
    path = tmp_path / "probe.py"
    path.write_text("from gateway.event import Event\nfrom gateway.fanout import feeds\n"
                    "def f():\n    import gateway.sources.mqtt\n")
    found = gateway_imports(path)
    assert {"gateway.fanout.feeds", "gateway.sources.mqtt"} <= found
    assert [m for m in found if not within(m, (*SHARED, "gateway.log"))] != []
