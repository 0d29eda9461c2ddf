#!/usr/bin/env python3
"""Module-level import graph of src/: `use crate::X` and `crate::X::` edges per top-level
module, comments and #[cfg(test)] test modules left out (tests are reported apart). Exits 1
if the graph has a cycle."""
import os, re, sys
from collections import defaultdict

ROOT = sys.argv[1] if len(sys.argv) > 1 else "src"
TOPS = ["wire", "history", "conn", "shard", "broker", "hub", "config", "error", "stats", "client",
        "auth", "process", "http", "metrics", "bench_support", "lib"]

def top_of(path):
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return "lib" if first == "lib.rs" else first.removesuffix(".rs")

def split_tests(text):
    """(code, tests): a `#[cfg(test)]` followed by `mod tests` starts the test part."""
    m = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*mod tests\b", text, re.M)
    return (text, "") if not m else (text[:m.start()], text[m.start():])

def edges_in(text, me):
    found = set()
    for line in text.splitlines():
        code = line.split("//", 1)[0]          # drop comments, doc comments included
        for m in re.finditer(r"\bcrate::(\w+)", code):
            found.add(m.group(1))
        # `use crate::{a, b::c}` groups
        for m in re.finditer(r"\bcrate::\{([^}]*)", code):
            for part in m.group(1).split(","):
                found.add(part.strip().split("::")[0])
    out = set()
    for target in found:
        # a re-export at the crate root (crate::Hub) counts as the module that defines it;
        # map the crate-root names used in code
        if target in TOPS and target != me:
            out.add(target)
        elif target and target[0].isupper():
            out.add(("root", target))
    return out

ROOT_NAMES = {}  # crate-root re-exports -> defining module, read from lib.rs
lib = open(os.path.join(ROOT, "lib.rs")).read()
for m in re.finditer(r"pub use (\w+)(?:::\w+)*::\{([^}]*)\}|pub use (\w+)(?:::\w+)*::(\w+);", lib):
    if m.group(1):
        for name in m.group(2).split(","):
            ROOT_NAMES[name.strip()] = m.group(1)
    else:
        ROOT_NAMES[m.group(4)] = m.group(3)

graph, tests = defaultdict(set), defaultdict(set)
for dirpath, _, files in os.walk(ROOT):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(dirpath, f)
        me = top_of(path)
        code, test = split_tests(open(path).read())
        for kind, text in (("code", code), ("test", test)):
            for e in edges_in(text, me):
                if isinstance(e, tuple):
                    e = ROOT_NAMES.get(e[1])
                    if e is None or e == me:
                        continue
                (graph if kind == "code" else tests)[me].add(e)

for m in TOPS:
    print(f"{m:14} -> {', '.join(sorted(graph[m])) or '-'}")
print("\ntest-only edges (cfg(test) modules; not part of the layering):")
for m in TOPS:
    extra = tests[m] - graph[m]
    if extra:
        print(f"{m:14} -> {', '.join(sorted(extra))}")

# cycle check (DFS), then a topological order bottom-up
state, order, cycle = {}, [], None
def dfs(n, stack):
    global cycle
    state[n] = 1
    stack.append(n)
    for d in sorted(graph[n]):
        if state.get(d) == 1 and cycle is None:
            cycle = stack[stack.index(d):] + [d]
        elif d not in state:
            dfs(d, stack)
    stack.pop()
    state[n] = 2
    order.append(n)
for m in TOPS:
    if m not in state:
        dfs(m, [])
if cycle:
    print("\nCYCLE: " + " -> ".join(cycle))
    sys.exit(1)
print("\nacyclic; bottom-up order: " + ", ".join(order))
