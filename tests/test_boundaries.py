"""The package boundaries: the core needs only torch and safetensors (and the numpy safetensors writes with); training and deployment never import each other.

``repblocks/`` is the core, ``repblocks/train/`` the ``[train]`` extra and ``repblocks/deploy/`` the
``[deploy]`` extra. ``repblocks/int8/`` is what both quantize with (extra ``[openvino]``): training
and deployment may import it, it imports neither of them, and the core does not import it. Imports are read from the source (function-level imports included), so a lazy
import that would cross a boundary is caught too; the core is also imported for real in a
process where every optional dependency is hidden.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repblocks"
SMOKE = Path(__file__).resolve().parent / "core_smoke.py"
CORE_DEPENDENCIES = {"torch", "safetensors"}
# Imported inside functions only, where the feature that needs them is used (huggingface_hub: timm's download cache).
CORE_LAZY = {"torchvision", "sklearn", "timm", "huggingface_hub", "hydra", "omegaconf", "PIL"}
OPTIONAL = ["lightning", "torchmetrics", "hydra", "omegaconf", "onnx", "onnxruntime", "onnxscript", "timm"]
# Engines of their own extras ([openvino], [tensorrt]): [train] and [deploy] alone must import without them.
ENGINE_EXTRAS = {"openvino", "nncf", "tensorrt"}
# numpy stays: safetensors writes through it (and torch uses it when present) without declaring it.
OPTIONAL += ["torchvision", "sklearn", "matplotlib", "rich", "PIL"]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at_top_level)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


PACKAGES = ("train", "deploy", "int8")  # the rest is the core
# What each part may import of the others; the core imports none of them.
MAY_IMPORT = {"core": set(), "train": {"int8"}, "deploy": {"int8"}, "int8": set()}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0] if relative[0] in PACKAGES else "core"


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_point_one_way(path):
    part = _part(path)
    stdlib = sys.stdlib_module_names
    for module, top_level in _imports(path):
        root = module.split(".")[0]
        if root == "repblocks":
            crossed = module.split(".")[1] if module.count(".") else ""
            if crossed in PACKAGES and crossed != part:
                assert crossed in MAY_IMPORT[part], f"repblocks.{part} imports {module}"
        elif root in ENGINE_EXTRAS:
            assert part != "core" and not top_level, f"{path.name} imports {module} at the top level"
        elif part == "core" and root not in stdlib:
            allowed = CORE_DEPENDENCIES if top_level else CORE_DEPENDENCIES | CORE_LAZY
            assert root in allowed, f"the core imports {module}{'' if top_level else ' (lazily)'}"


def test_core_works_with_only_torch_and_safetensors():
    """tests/core_smoke.py, in a process where every optional dependency is hidden (CI also runs it in a core-only venv)."""
    code = f"""
import importlib.abc, runpy, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
sys.meta_path.insert(0, Hide())
sys.exit(runpy.run_path({str(SMOKE)!r})["main"]())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("core ok"), result.stderr


def _module_name(path: Path) -> str:
    parts = ["repblocks", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _repblocks_imports(path: Path, modules: set[str]) -> set[str]:
    """The repblocks modules ``path`` imports, at any level: ``from repblocks import checkpoint`` names a module too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    # A package's __init__ runs before its modules, but it is an entry point, not a dependency of theirs.
    return {name for name in found if name in modules and name != "repblocks" and name != _module_name(path)}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node], _ = "done", stack.pop()
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_cores_imports_have_no_cycle():
    """Imports point down (STYLE.md): no two core modules import each other, not even through a function-level import."""
    core = [path for path in FILES if _part(path) == "core"]
    modules = {_module_name(path) for path in core}
    graph = {_module_name(path): _repblocks_imports(path, modules) for path in core}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _runtime_imports(path: Path) -> set[str]:
    """The repblocks modules ``path`` imports when it runs, at any level (``if TYPE_CHECKING:`` blocks are for types)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("repblocks.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("repblocks"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a submodule, when it is one
    return found


def _dotted_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_deploy_modules_import_no_cycle():
    modules = {_dotted_name(path): path for path in sorted((PACKAGE / "deploy").glob("*.py"))}
    graph = {name: _runtime_imports(path) & modules.keys() - {name} for name, path in modules.items()}
    graph["repblocks.deploy"] = set()  # the package's __init__ re-exports; a module importing it is not a cycle

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for imported in graph[node]:
            if imported == start:
                return (*seen, imported)
            if imported not in seen:
                found = cycle_from(start, imported, (*seen, imported))
                if found:
                    return found
        return None

    for name in graph:
        cycle = cycle_from(name, name, (name,))
        assert cycle is None, " -> ".join(cycle)


def test_building_a_deploy_config_loads_no_inference_engine():
    code = (
        "import sys\n"
        "from repblocks.deploy.config import DeployConfig\n"
        "DeployConfig.from_dict({'model': 'repvgg_tiny', 'export': {'formats': ['onnx']}})\n"
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'nncf', 'tensorrt') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_the_library_never_ends_the_process(path):
    """Only entry scripts decide how a process ends (repblocks/cli.py for them): the library raises its errors."""
    if path == PACKAGE / "cli.py":
        return
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            assert getattr(raised, "id", None) != "SystemExit", f"{path.name}:{node.lineno} raises SystemExit"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called = f"{getattr(node.func.value, 'id', '')}.{node.func.attr}"
            assert called not in ("sys.exit", "os._exit"), f"{path.name}:{node.lineno} calls {called}"


def test_an_interrupt_raised_by_the_library_is_its_one_line_and_status_130(capsys):
    from repblocks.cli import exit_on_user_error
    from repblocks.errors import Interrupted

    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        raise Interrupted("interrupted at step 3 of QAT: nothing was written")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted at step 3 of QAT: nothing was written\n"
