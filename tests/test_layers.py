"""The import graph keeps the layers of llada_jax/__init__.py apart: the method does not import
the runner, the trainer does not import the evaluation job, and the kernels import nothing from
the runner. Read from the source with `ast` (no module is imported, so no jax)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "llada_jax"

# The method layer: pure functions of arrays and keys (llada_jax/__init__.py).
METHOD = (
    "model",
    "diffusion",
    "sampling",
    "block_sampling",
    "likelihood",
    "guidance",
    "optim",
    "train_step",
    "special_ids",
)
# The runner: a run's objects, its loop, its jobs and its files (llada_jax/__init__.py), with
# the packages `data` and `convert`. `sharding` (mesh and logical-axis rules) is runner too, but
# see SHARDING_ALLOWED.
RUNNER = (
    "run",
    "run_sections",
    "cli",
    "train",
    "end_of_run",
    "inference",
    "evaluate",
    "lm_eval_model",
    "sweep",
    "compare",
    "config",
    "checkpoint",
    "metrics",
    "files",
    "sharding",
    "profiling",
    "writer_lock",
    "fingerprint",
    "sample_stats",
    "data",
    "convert",
)
# The method modules allowed to import `sharding`, and only it of the runner: `model` names its
# activations' logical axes (`sharding.constrain`) and maps them to the splash kernel's
# partition specs (`sharding.logical_spec`); `train_step` and `likelihood` jit their step and
# scorer on a mesh with the batch split over its data-parallel axes (`sharding.batch_sharding`,
# `sharding.jit_on_mesh`). `sharding` itself imports nothing from llada_jax, so this lets no
# other runner module in.
SHARDING_ALLOWED = ("model", "train_step", "likelihood")
# The platform: what the kernels may import.
PLATFORM = ("kernels", "host")
# How a config section is declared (a dataclass per section): every layer may import it, and it
# imports nothing from llada_jax.
BASE = ("sections",)


def _path(module: str) -> pathlib.Path | None:
    """The source file of a llada_jax module ("llada_jax.kernels.splash"), None if not one."""
    parts = module.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports(module: str) -> set[str]:
    """The llada_jax modules `module` imports anywhere in its source (inside functions too), as
    dotted names; `from llada_jax import x` counts as importing llada_jax.x."""
    path = _path(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if _path(sub) is not None else base)
    return {name for name in found if name.split(".")[0] == "llada_jax"}


def closure(module: str) -> set[str]:
    """Every llada_jax module importing `module` loads: its imports, theirs, and each one's
    enclosing packages (whose __init__ runs first)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or _path(name) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))
        todo.extend(imports(name))
    return seen - {module}


def top(module: str) -> str:
    """The name under llada_jax: "llada_jax.data.sft" -> "data"; "" for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_is_placed():
    """Each top-level module is in exactly one layer, so that a new one gets a decision here."""
    placed = set(METHOD) | set(RUNNER) | set(PLATFORM) | set(BASE)
    assert len(placed) == len(METHOD) + len(RUNNER) + len(PLATFORM) + len(BASE)
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert names == placed


@pytest.mark.parametrize("name", METHOD)
def test_method_imports_no_runner(name):
    loaded = closure(f"llada_jax.{name}")
    allowed = {"sharding"} if name in SHARDING_ALLOWED else set()
    runner = sorted(m for m in loaded if top(m) in RUNNER and top(m) not in allowed)
    assert not runner, f"llada_jax.{name} loads runner modules {runner}"


@pytest.mark.parametrize("name", ("sharding", *BASE))
def test_imports_nothing_from_llada_jax(name):
    """What SHARDING_ALLOWED and BASE rely on."""
    assert not closure(f"llada_jax.{name}") - {"llada_jax"}


def test_the_training_loop_sits_below_the_evaluation_job():
    """The loop loads none of the evaluation job's modules, even indirectly; its command line
    (llada_jax/train/__main__.py, an entry point like tools/) prints the end-of-run report."""
    banned = {"evaluate", "inference", "likelihood", "lm_eval_model", "end_of_run"}
    found = sorted(m for m in closure("llada_jax.train.loop") if top(m) in banned)
    assert not found, f"llada_jax.train.loop loads {found}"
    assert "llada_jax.end_of_run" in imports("llada_jax.train.__main__")


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("kernels/*.py")), ids=lambda p: p.stem)
def test_kernels_import_nothing_from_runner(path):
    module = "llada_jax.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
    outside = sorted(
        m for m in closure(module) if top(m) not in PLATFORM + BASE and m != "llada_jax"
    )
    assert not outside, f"{module} loads {outside}"


def test_the_checks_see_imports():
    """The parser finds what it must: a sanity check of `imports` and `closure`."""
    assert "llada_jax.sharding" in imports("llada_jax.model")
    assert "llada_jax.kernels.attention" in imports("llada_jax.model")
    assert "llada_jax.host.cache" in closure("llada_jax.kernels.attention")
    assert "llada_jax.kernels.mkl" in closure("llada_jax.model")
    assert "llada_jax.run" in closure("llada_jax.train.loop")
