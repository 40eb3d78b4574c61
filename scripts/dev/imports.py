#!/usr/bin/env python3
"""Import circles between the crate's modules, from the source text.

A module is a file under src/ (`a/mod.rs` is `a`); an edge a -> b is a `crate::b...` path (or a
`super::` path resolved to one) in a's text, attributed to the longest module path it names.
A module and its own descendants are one concept, so edges between them do not count. Prints the
module and edge counts and every strongly connected component of more than one module.

    python3 scripts/dev/imports.py src
"""
import re
import sys
from pathlib import Path


def module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ""
    return "::".join(parts)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    files = [p for p in root.rglob("*.rs") if "bin" not in p.relative_to(root).parts]
    modules = {module_of(p, root): p for p in files}
    names = sorted((m for m in modules if m), key=len, reverse=True)
    edges = set()
    for m, p in modules.items():
        text = p.read_text()
        text = re.sub(r"//[^\n]*", "", text)
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        here = m if p.name == "mod.rs" else parent
        paths = re.findall(r"crate((?:::\w+)+)", text)
        paths += [
            (("::" + here) if here else "") + s
            for s in re.findall(r"super((?:::\w+)+)", text)
        ]
        for raw in paths:
            target = raw.strip(":")
            best = next((n for n in names if target == n or target.startswith(n + "::")), None)
            if best is None or best == m:
                continue
            if best.startswith(m + "::") or m.startswith(best + "::"):
                continue
            edges.add((m, best))
    graph = {m: [b for a, b in edges if a == m] for m in modules}
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    print(f"{len(modules)} modules, {len(edges)} edges, {len(sccs)} cycles")
    for c in sccs:
        print("  cycle:", " <-> ".join(c))
    return 1 if sccs else 0


if __name__ == "__main__":
    sys.exit(main())
