"""The layout's rules, checked on the source: no import cycle, size limits, the step loop on one screen, a
complete set of files per fused loss, and one registration per loss kind, method and trainer option."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fastkd": REPO / "fastkd", "fastkd.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every fastkd module ``name`` imports, at the top or inside a function."""
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    out.add(f"{base}.{a.name}")  # from fastkd import losses: the module fastkd.losses
                elif base in known:
                    out.add(base)
    return out - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, stack + [nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_cycle_inside_fastkd_including_function_local_imports():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # A package's __init__ runs before any of its modules; an edge into it from its own modules is not a cycle
    # of fastkd's design but of Python's package import, so only explicit module-to-module edges count.
    for m in graph:
        graph[m] -= set(PACKAGES) if m not in PACKAGES else set()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the walker finds one


def _sizes():
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        yield path, "file", path.name, len(path.read_text().splitlines())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield path, kind, node.name, node.end_lineno - node.lineno + 1


LIMITS = {"file": 700, "class": 300, "function": 80}


def test_no_file_class_or_function_over_its_limit():
    over = [f"{p.relative_to(REPO)}: {kind} {name} has {n} lines (limit {LIMITS[kind]})"
            for p, kind, name, n in _sizes() if n > LIMITS[kind]]
    assert not over, "\n".join(over)


def test_the_step_loop_is_one_function_on_one_screen():
    from fastkd import engine, trainer

    tree = ast.parse(Path(engine.__file__).read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run_epoch")
    assert loop.end_lineno - loop.lineno + 1 <= 60
    # both the trainer and the teacher fine-tune go through it (no second loop)
    for module in (trainer, importlib.import_module("fastkd.finetune")):
        assert "fit_stage(" in Path(module.__file__).read_text()


KERNEL_OPS = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if not p.stem.startswith("_")
                    and p.stem not in ("saving",))


def test_every_fused_loss_has_reference_kernel_test_and_benchmark():
    from fastkd import losses, reference

    assert KERNEL_OPS == ["attention_kl", "attention_mse", "hidden_mse", "sinkhorn"]
    for op in KERNEL_OPS:
        assert callable(getattr(reference, op, None)), f"fastkd.reference.{op} is missing"
        assert callable(getattr(losses, op, None)), f"fastkd.losses.{op} is missing"
        assert (REPO / "tests" / f"test_{op}.py").is_file(), f"tests/test_{op}.py is missing"
        assert (REPO / "bench" / f"bench_{op}.py").is_file(), f"bench/bench_{op}.py is missing"
        assert callable(getattr(importlib.import_module(f"fastkd.kernels.{op}"), op, None))


# ---------------------------------------------------------------- one registration per concept


@pytest.fixture
def scratch_registries():
    from fastkd import recipes, terms

    kinds, methods = dict(terms.KINDS), dict(recipes.REGISTRY)
    yield
    terms.KINDS.clear()
    terms.KINDS.update(kinds)
    recipes.REGISTRY.clear()
    recipes.REGISTRY.update(methods)


def test_a_loss_kind_is_one_registration(scratch_registries):
    from transformers import BertModel

    from fastkd.distill import DistillModule
    from fastkd.recipes import Recipe, Shapes, Stage
    from fastkd.terms import LossTerm, TermKind, capture_plan, register_kind, stage_fields
    from tests.helpers import tiny_bert_config

    def capture(term, side, plan):
        plan["hidden"].update(p[side] for p in term.pairs)

    def compute(x, term):  # the squared distance of the mean hidden states
        (i, j), = term.pairs
        return (x.s[f"hidden.{i}"].mean() - x.t[f"hidden.{j}"].mean()) ** 2

    register_kind(TermKind("mean_gap", "test kind", capture, compute))
    term = LossTerm("mean_gap", 2.0, [(1, 3)])
    assert capture_plan([term], "teacher")["hidden"] == {3}
    assert stage_fields([term], "student", 2) == ["hidden.1"]
    shapes = Shapes(4, 2, 32, 32, 4, 4)
    torch.manual_seed(0)
    student = BertModel(tiny_bert_config(num_hidden_layers=2))
    module = DistillModule(student, shapes, Recipe("x", [Stage("s", [term], 1, 1e-3)]))
    module.set_stage(Stage("s", [term], 1, 1e-3))
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    teacher = {"hidden.3": torch.randn(2, 7, 32)}
    total, parts = module(ids, mask, None, teacher)
    assert set(parts) == {"mean_gap"} and total.requires_grad and float(total.detach()) > 0
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(TermKind("mean_gap", "again", capture, compute))


def test_a_method_is_one_registration(scratch_registries):
    from fastkd.config import TrainConfig, build_parser, recipe_settings_help
    from fastkd.recipes import Shapes, Stage, build_recipe, make_params, register_method
    from fastkd.terms import LossTerm

    @dataclasses.dataclass
    class LogitsOnly:
        temperature: float = 3.0
        epochs: int = 1
        lr: float = 1e-4

    @register_method("logits-only", LogitsOnly, ("logits-only", "lo"))
    def build(p, shapes):
        return [Stage("kd", [LossTerm("soft_ce", 1.0, temperature=p.temperature)], p.epochs, p.lr)]

    recipe = build_recipe("logits-only", Shapes(4, 2, 32, 32, 4, 4), make_params("logits-only", {"lo.temperature": 5}))
    assert recipe.stages[0].terms[0].temperature == 5.0
    with pytest.raises(ValueError, match="lr"):
        make_params("logits-only", {"lo.lr": -1})  # the range checks apply to it too
    assert TrainConfig(method="logits-only").method == "logits-only"
    assert "logits-only (logits-only.FIELD): temperature=3.0" in recipe_settings_help()
    assert build_parser().parse_args(["--method", "logits-only"]).method == "logits-only"


def test_a_trainer_option_is_one_field():
    from fastkd.config import TrainConfig, build_parser, option, positive

    Extended = dataclasses.make_dataclass(
        "Extended", [("probe_every", int, option(4, "steps between probes", check=positive))], bases=(TrainConfig,))
    parser = build_parser(Extended)
    assert parser.parse_args(["--probe-every", "7"]).probe_every == 7
    assert "steps between probes (default: 4)" in " ".join(parser.format_help().split())
    with pytest.raises(ValueError, match=r"--probe-every: expected a positive integer, got 0"):
        Extended(probe_every=0)
