"""The package's layers, as docs/architecture.md draws them: a module imports only from its own
layer or the ones below, no module imports itself back through others, and only the mitmproxy
layer (and the command line above it) uses mitmproxy's addon machinery. Every import counts,
including those inside functions and under TYPE_CHECKING."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "affinity_addon"

# Lowest first. A module's layer is its subpackage, or its own name for top-level modules.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"apis", "tokens", "jsonpath", "durations", "models", "decoding", "ttl_policy",
               "buckets"}),
    frozenset({"catalog"}),
    frozenset({"record"}),
    frozenset({"request"}),
    frozenset({"response"}),
    frozenset({"diagnosis"}),
    frozenset({"views"}),
    frozenset({"mitm"}),
    frozenset({"cli", "addon", "__main__"}),
)
ADDON_MACHINERY = ("mitmproxy.ctx", "mitmproxy.hooks", "mitmproxy.addonmanager",
                   "mitmproxy.command", "mitmproxy.master")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"{module}: in no layer; add it to LAYERS and docs/architecture.md")


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The package's modules that `path` imports (a `from pkg import mod` names the module)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {i for i in imports(p, m, known) if i in known and i != m} for m, p in mods.items()}


def test_every_module_has_a_layer() -> None:
    for m in modules():
        if m != "affinity_addon":
            layer_of(m)


def test_imports_point_down() -> None:
    wrong = [f"{m} (layer {layer_of(m)}) imports {i} (layer {layer_of(i)})"
             for m, deps in graph().items() if m != "affinity_addon"
             for i in deps if i != "affinity_addon" and layer_of(i) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ importing its own modules is how a package exposes them, not a cycle.
    for m, deps in g.items():
        g[m] = {d for d in deps if not (m.startswith(d + ".") and (PACKAGE.parent / Path(
            *d.split("."))).is_dir())}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_only_the_mitmproxy_layer_uses_addon_machinery() -> None:
    mitm = LAYERS.index(frozenset({"mitm"}))
    wrong = []
    for m, p in modules().items():
        if m == "affinity_addon" or layer_of(m) >= mitm:
            continue
        for i in imports(p, m, set()):
            if i.startswith(ADDON_MACHINERY) or i in ("mitmproxy.ctx",):
                wrong.append(f"{m} imports {i}")
    assert not wrong, "\n".join(wrong)


def test_the_layering_test_catches_an_upward_import(tmp_path: Path) -> None:
    # the checks above run on the real tree; this shows they can fail
    fake = tmp_path / "affinity_addon" / "catalog"
    fake.mkdir(parents=True)
    src = fake / "x.py"
    src.write_text("from affinity_addon.views import report\nfrom . import y\n")
    found = imports(src, "affinity_addon.catalog.x",
                    {"affinity_addon.views.report", "affinity_addon.catalog.y"})
    assert "affinity_addon.views.report" in found and "affinity_addon.catalog.y" in found
    assert layer_of("affinity_addon.views.report") > layer_of("affinity_addon.catalog.x")
