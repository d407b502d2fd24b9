"""The house rules that keep the package simple: imports point one way, only comm.py touches MPI."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mpitrain"


def top_level(body):
    """The statements run at import, also inside a top-level try or if (not inside functions)."""
    for node in body:
        yield node
        if isinstance(node, (ast.Try, ast.If)):
            yield from top_level(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))


def module_imports() -> dict:
    """mpitrain module -> the mpitrain modules it imports at its top level (not inside functions)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = ".".join(parts[:-1])
        found = set()
        for node in top_level(ast.parse(path.read_text()).body):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    return graph


def test_no_circular_imports_between_modules():
    graph = module_imports()
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for t in edges[m]:
            if not m.startswith(t + "."):  # a module importing its own package's __init__ is not a cycle
                visit(t, path + [m])
        state[m] = "done"
    for m in edges:
        visit(m, [])


def test_only_comm_imports_mpi4py():
    users = sorted(m for m, targets in module_imports().items() if any(t.startswith("mpi4py") for t in targets))
    assert users == ["mpitrain.comm"]


def test_the_compressor_table_names_every_registered_compressor_and_its_module():
    from mpitrain import compress
    from mpitrain.compress import auto, base, dense, lowrank, quantize  # noqa: F401  (each registers its classes)
    assert sorted(base.REGISTRY) == compress.names()
    for name in compress.names():
        assert compress.compressor_class(name).__module__ == f"mpitrain.compress.{compress.FAMILY[name]}"


def test_no_module_over_450_lines_and_no_class_over_200():
    """A room that grows past these has two concerns in it: split it along them."""
    long_modules, long_classes = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 450:
            long_modules.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                long_classes.append(f"{path.relative_to(PACKAGE)}: {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert long_modules == [] and long_classes == []


def test_the_control_words_are_read_by_name_only():
    """Every read and write of the control words goes through `layout.Control`, which names them."""
    by_position = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py")) if path.name != "layout.py"
                   for n, line in enumerate(path.read_text().splitlines(), 1) if "control[" in line]
    assert by_position == []
