"""Argo CD's Lua for resource health and actions, run as Argo CD runs it, in two interpreters.

``run_script`` (lupa's C Lua 5.1) and ``run_gopher`` (gopher-lua v1.1.2, the interpreter Argo CD
embeds, through hack/argocd-lua built by `make tools`) take away the same libraries.

Argo CD (util/lua/lua.go) runs a script from argocd-cm in gopher-lua, a Lua 5.1, created with
SkipOpenLibs, then opens only the package, base and table libraries and its "safe" os (time and
date), registered so that only ``require("os")`` reaches it (the global ``os`` stays nil); no
string, math, io, coroutine or debug library. The live object is the global ``obj``. Here the
scripts run in lupa's real Lua 5.1 (``lupa.lua51``) with the same libraries taken away. Empty
tables come back as JSON arrays, restored to the input's maps as Argo CD's cleanReturnedObj does.
The clock is frozen so action outputs are reproducible.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.harness.procs import REPO

CUSTOMIZATIONS = REPO / "manifests" / "argocd" / "resource_customizations"
FROZEN_TIME = 1767225600  # 2026-01-01T00:00:00Z: os.date/os.time without a time argument use it

_SANDBOX = """
local real_os, frozen = os, ...
local safe_os = {
  time = function(t) if t == nil then return frozen end return real_os.time(t) end,
  date = function(fmt, t) return real_os.date(fmt, t or frozen) end,
}
-- Argo CD's OpenSafeOs registers time and date into the table library's module, not as `os`.
table.time, table.date = safe_os.time, safe_os.date
os, io, debug, string, math, coroutine = nil, nil, nil, nil, nil, nil
package.loadlib, package.cpath, package.path = nil, "", ""
for k in pairs(package.loaders or {}) do if k > 2 then package.loaders[k] = nil end end
for name in pairs(package.loaded) do
  if name ~= "_G" and name ~= "package" and name ~= "table" then package.loaded[name] = nil end
end
package.preload.os = function() return safe_os end
"""


def _runtime():  # type: ignore[no-untyped-def]
    from lupa import lua51  # type: ignore[import-untyped]

    lua = lua51.LuaRuntime(register_eval=False, register_builtins=False, unpack_returned_tuples=True)
    lua.execute(_SANDBOX, FROZEN_TIME)
    return lua


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def _to_py(lua: Any, value: Any) -> Any:
    from lupa import lua51

    if lua51.lua_type(value) != "table":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value
    items = list(value.items())
    keys = [k for k, _ in items]
    if not keys:
        return []  # gopher-json encodes an empty table as an array
    if all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
        return [_to_py(lua, value[i]) for i in range(1, len(keys) + 1)]
    return {k: _to_py(lua, v) for k, v in items}


def _restore_empty_arrays(new: Any, old: Any) -> Any:
    """Argo CD's cleanReturnedObj: Lua has one empty table for [] and {}, which comes back as [];
    where the input had a map there, the input's value is kept."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _restore_empty_arrays(v, old[k]) if k in old else v for k, v in new.items()}
    if isinstance(new, list) and isinstance(old, dict):
        return new or old
    if isinstance(new, list) and isinstance(old, list):
        return [_restore_empty_arrays(n, o) for n, o in zip(new, old, strict=False)] + new[len(old) :]
    return new


def run_script(script: Path, obj: dict[str, Any]) -> Any:
    """Run one health.lua/discovery.lua/action.lua with ``obj``; its return value as Python."""
    original = copy.deepcopy(obj)
    lua = _runtime()
    lua.globals().obj = _to_lua(lua, obj)
    fn = lua.eval(
        "function(src, name) local f, err = loadstring(src, name); "
        "if f == nil then error(err) end; return f() end"
    )
    return _restore_empty_arrays(_to_py(lua, fn(script.read_text(), "@" + script.name)), original)


def gopher_binary() -> Path | None:
    """hack/argocd-lua as built by hack/build-tools.sh (`make tools`), or None."""
    from tests.harness.cluster import CACHE

    path = CACHE / "tools" / "bin" / "argocd-lua"
    return path if path.is_file() else None


def run_gopher_many(cases: list[tuple[Path, dict[str, Any]]]) -> list[Any]:
    """Run each (script, obj) in gopher-lua with Argo CD's libraries; each result as Python
    (an exception's text becomes ``{"error": ...}``). Empty maps restored as Argo CD does."""
    import json
    import subprocess

    binary = gopher_binary()
    assert binary is not None, "argocd-lua is not built: `make tools`"
    req = {"frozenTime": FROZEN_TIME, "cases": [{"script": str(p), "obj": o} for p, o in cases]}
    proc = subprocess.run([str(binary)], input=json.dumps(req), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = []
    for (_, obj), res in zip(cases, json.loads(proc.stdout), strict=True):
        out.append({"error": res["error"]} if "error" in res else _restore_empty_arrays(res["result"], obj))
    return out


def run_gopher(script: Path, obj: dict[str, Any]) -> Any:
    """Like run_script, under gopher-lua (a script error raises)."""
    (res,) = run_gopher_many([(script, copy.deepcopy(obj))])
    if isinstance(res, dict) and set(res) == {"error"}:
        raise RuntimeError(res["error"])
    return _ints(res)


def _ints(value: Any) -> Any:
    """JSON numbers from Lua are floats; whole ones compare as the ints the fixtures hold."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def kinds() -> list[Path]:
    return sorted(p for p in CUSTOMIZATIONS.glob("*/*") if (p / "health.lua").exists())


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
