// Command argocd-lua runs Argo CD resource customizations (health.lua, discovery.lua, action.lua)
// in gopher-lua the way Argo CD's util/lua runs a script from argocd-cm: a state created without
// the standard libraries, then only the package, base and table libraries and a "safe" os with
// time and date, reachable through require("os") (the global os stays nil); no string, math, io,
// coroutine or debug library; the live object as the global obj; a one-second deadline.
//
// It reads {"frozenTime": <unix seconds or 0>, "cases": [{"script": path, "obj": {...}}]} as JSON
// on stdin and writes one JSON result per case, in order: {"result": <the script's return value>}
// or {"error": "..."}. Tables are encoded as Argo CD's JSON encoder does: an empty table is [],
// a table with keys 1..n is an array, any other table an object. The comparison with the
// expected values (and Argo CD's cleanup of empty maps) is done by the caller
// (tests/install/argocd_lua.py).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
)

type request struct {
	FrozenTime int64 `json:"frozenTime"`
	Cases      []struct {
		Script string         `json:"script"`
		Obj    map[string]any `json:"obj"`
	} `json:"cases"`
}

type result struct {
	Result any    `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

func main() {
	var req request
	dec := json.NewDecoder(os.Stdin)
	if err := dec.Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua: reading the request:", err)
		os.Exit(2)
	}
	clock := func() time.Time { return time.Now() }
	if req.FrozenTime != 0 {
		clock = func() time.Time { return time.Unix(req.FrozenTime, 0) }
	}
	out := make([]result, 0, len(req.Cases))
	for _, c := range req.Cases {
		src, err := os.ReadFile(c.Script)
		if err != nil {
			out = append(out, result{Error: err.Error()})
			continue
		}
		v, err := run(string(src), c.Obj, clock)
		if err != nil {
			out = append(out, result{Error: err.Error()})
			continue
		}
		out = append(out, result{Result: v})
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua:", err)
		os.Exit(2)
	}
}

func run(src string, obj map[string]any, clock func() time.Time) (any, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	safeOs := map[string]lua.LGFunction{"time": osTime(clock), "date": osDate(clock)}
	libs := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		// Argo CD registers its safe os functions into the table library's module.
		{lua.OsLibName, func(L *lua.LState) int {
			L.Push(L.RegisterModule(lua.TabLibName, safeOs))
			return 1
		}},
	}
	for _, lib := range libs {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			return nil, err
		}
	}
	L.PreloadModule(lua.OsLibName, func(L *lua.LState) int {
		L.Push(L.SetFuncs(L.NewTable(), safeOs))
		return 1
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(src); err != nil {
		return nil, err
	}
	ret := L.Get(-1)
	if ret.Type() != lua.LTTable {
		return nil, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
	return fromLua(ret, 0)
}

func toLua(L *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case []any:
		t := L.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]any:
		t := L.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(L, item))
		}
		return t
	}
	return lua.LNil
}

func fromLua(v lua.LValue, depth int) (any, error) {
	if depth > 100 {
		return nil, errors.New("nested too deeply")
	}
	switch x := v.(type) {
	case *lua.LNilType:
		return nil, nil
	case lua.LBool:
		return bool(x), nil
	case lua.LNumber:
		return float64(x), nil
	case lua.LString:
		return string(x), nil
	case *lua.LTable:
		n := x.MaxN()
		count := 0
		x.ForEach(func(_, _ lua.LValue) { count++ })
		if count == 0 {
			return []any{}, nil
		}
		if n == count {
			arr := make([]any, 0, n)
			for i := 1; i <= n; i++ {
				item, err := fromLua(x.RawGetInt(i), depth+1)
				if err != nil {
					return nil, err
				}
				arr = append(arr, item)
			}
			return arr, nil
		}
		m := map[string]any{}
		var err error
		x.ForEach(func(k, item lua.LValue) {
			if err != nil {
				return
			}
			ks, ok := k.(lua.LString)
			if !ok {
				err = fmt.Errorf("a table mixes array and object keys (key %v)", k)
				return
			}
			m[string(ks)], err = fromLua(item, depth+1)
		})
		return m, err
	}
	return nil, fmt.Errorf("cannot encode a Lua %s", v.Type())
}

func osTime(clock func() time.Time) lua.LGFunction {
	return func(L *lua.LState) int {
		if L.GetTop() == 0 {
			L.Push(lua.LNumber(clock().Unix()))
			return 1
		}
		t := L.CheckTable(1)
		field := func(name string, def int) int {
			if n, ok := t.RawGetString(name).(lua.LNumber); ok {
				return int(n)
			}
			return def
		}
		when := time.Date(field("year", 1970), time.Month(field("month", 1)), field("day", 1),
			field("hour", 12), field("min", 0), field("sec", 0), 0, time.Local)
		L.Push(lua.LNumber(when.Unix()))
		return 1
	}
}

// osDate supports the conversions the customizations use (and the usual numeric ones).
func osDate(clock func() time.Time) lua.LGFunction {
	layouts := map[byte]string{
		'Y': "2006", 'y': "06", 'm': "01", 'd': "02", 'H': "15", 'M': "04", 'S': "05",
		'X': "15:04:05", 'F': "2006-01-02", 'Z': "MST", 'z': "-0700", 'b': "Jan", 'a': "Mon",
	}
	return func(L *lua.LState) int {
		format := L.OptString(1, "%c")
		t := clock().Local()
		if strings.HasPrefix(format, "!") {
			t, format = t.UTC(), format[1:]
		}
		if L.GetTop() >= 2 {
			t = time.Unix(L.CheckInt64(2), 0).In(t.Location())
		}
		var b strings.Builder
		for i := 0; i < len(format); i++ {
			if format[i] != '%' || i == len(format)-1 {
				b.WriteByte(format[i])
				continue
			}
			i++
			switch c := format[i]; {
			case c == '%':
				b.WriteByte('%')
			case c == 'c':
				b.WriteString(t.Format(time.ANSIC))
			case c == 'w':
				b.WriteString(strconv.Itoa(int(t.Weekday())))
			default:
				if layout, ok := layouts[c]; ok {
					b.WriteString(t.Format(layout))
				} else {
					b.WriteByte('%')
					b.WriteByte(c)
				}
			}
		}
		L.Push(lua.LString(b.String()))
		return 1
	}
}

