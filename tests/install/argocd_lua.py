"""Argo CD's Lua for resource health and actions, run as Argo CD runs it.

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


def kinds() -> list[Path]:
    return sorted(p for p in CUSTOMIZATIONS.glob("*/*") if (p / "health.lua").exists())


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())
