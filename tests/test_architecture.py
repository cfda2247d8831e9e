"""The layout's rules, checked on the source: no import cycle, size limits, the step loop on one screen, a
complete set of files per fused loss, and one registration per loss kind, method and trainer option."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fastkd": REPO / "fastkd", "fastkd.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    """Every fastkd module (its subpackages' too) and every kernel module, by dotted name."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py") if pkg == "fastkd" else folder.glob("*.py")):
            parts = [pkg, *path.relative_to(folder).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _packages() -> set[str]:
    return {m for m, p in _modules().items() if p.stem == "__init__"}


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
    packages = _packages()
    for m in graph:  # only a module's own enclosing packages (the Python package import), not any package
        graph[m] -= {p for p in packages if m.startswith(p + ".")}
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
    from fastkd.training import engine, trainer

    tree = ast.parse(Path(engine.__file__).read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run_epoch")
    assert loop.end_lineno - loop.lineno + 1 <= 60
    # both the trainer and the teacher fine-tune go through it (no second loop)
    for module in (trainer, importlib.import_module("fastkd.training.finetune")):
        assert "fit_stage(" in Path(module.__file__).read_text()


KERNEL_OPS = sorted(p.stem for p in (REPO / "kernels").glob("*.py") if not p.stem.startswith("_")
                    and p.stem not in ("saving",))


def test_every_fused_loss_has_reference_kernel_test_and_benchmark():
    from fastkd import losses
    from fastkd.losses import reference

    assert KERNEL_OPS == ["attention_kl", "attention_mse", "hidden_mse", "sinkhorn"]
    for op in KERNEL_OPS:
        assert callable(getattr(reference, op, None)), f"fastkd.losses.reference.{op} is missing"
        assert callable(getattr(losses, op, None)), f"fastkd.losses.{op} is missing"
        assert (REPO / "tests" / f"test_{op}.py").is_file(), f"tests/test_{op}.py is missing"
        assert (REPO / "bench" / f"bench_{op}.py").is_file(), f"bench/bench_{op}.py is missing"
        assert callable(getattr(importlib.import_module(f"fastkd.kernels.{op}"), op, None))


# ---------------------------------------------------------------- one registration per concept


@pytest.fixture
def scratch_registries():
    from fastkd import recipes, terms
    from fastkd.models import families

    saved = [(r, dict(r)) for r in (terms.KINDS, terms.FIELDS, recipes.REGISTRY, families.FAMILIES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


# ---------------------------------------------------------------- values, not the whole config (#22)

CLI_AND_TRAINER = {"fastkd.config", "fastkd.train", "fastkd.training.trainer"}
REGISTRIES = {"fastkd.terms": {"KINDS", "FIELDS"}, "fastkd.recipes": {"REGISTRY"},
              "fastkd.models.families": {"FAMILIES"}}


def test_only_the_cli_and_the_trainer_know_the_whole_config():
    """No other module imports TrainConfig or has a function taking a ``cfg``: they take the values they use
    (the trainer builds DataSettings, StudentSettings, FinetuneConfig, the run identity and a RunSummary)."""
    offenders = []
    for name, path in _modules().items():
        if name in CLI_AND_TRAINER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and any(a.name == "TrainConfig" for a in node.names):
                offenders.append(f"{name} imports TrainConfig")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if any(a.arg == "cfg" for a in args):
                    offenders.append(f"{name}.{node.name} takes cfg")
    assert not offenders, offenders


def test_registries_are_read_through_their_accessors():
    """A registry dict is named only in its own module, and never copied there at import (a module-level value
    computed from it misses what is registered later: --mode general once missed a later kind)."""
    offenders = []
    for name, path in _modules().items():
        own = REGISTRIES.get(name, set())
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in set().union(*REGISTRIES.values()) - own:
                offenders.append(f"{name} reads {node.id}")
        for node in tree.body:  # module level, outside functions: a copy made at import
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                used = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)} & own
                if used and not (isinstance(node.value, ast.Dict) and not node.value.keys):
                    offenders.append(f"{name} copies {used} at import (line {node.lineno})")
    assert not offenders, offenders


def test_a_loss_kind_with_a_new_captured_field_is_one_registration(scratch_registries, tmp_path):
    """A kind reading the FFN's intermediate activations (a field nothing else captures) is declared in its own
    registration, and trains end to end in fastkd.train: capture, the teacher cache and the plan pick it up."""
    import math

    from fastkd import train
    from fastkd.recipes import Stage, register_method
    from fastkd.terms import CapturedField, LossTerm, TermKind, reads_layers, register_kind
    from tests.helpers import make_teacher, write_task

    def compute(x, term):
        return sum((x.s[f"ffn_act.{i}"].mean(-1) - x.t[f"ffn_act.{j}"].float().mean(-1)).square()[x.mask].mean()
                   for i, j in term.pairs)

    register_kind(TermKind("ffn_gap", "mean FFN activation gap", reads_layers("ffn_act"), compute,
                           fields=(CapturedField("ffn_act", "intermediate.dense", paths={"distilbert": "ffn.lin1"}),)))

    @dataclasses.dataclass
    class FFNParams:
        epochs: int = 2
        lr: float = 1e-3

    @register_method("ffn-gap", FFNParams)
    def build(p, shapes):
        return [Stage("ffn", [LossTerm("ffn_gap", 1.0, [(0, 1), (1, 3)])], p.epochs, p.lr)]

    out = tmp_path / "out"
    data = write_task(tmp_path / "data")
    argv = ["--method", "ffn-gap", "--teacher", str(make_teacher(tmp_path / "t")), "--task", str(data / "train.tsv"),
            "--output-dir", str(out), "--student-layers", "2", "--student-hidden", "32", "--student-heads", "4",
            "--student-ffn", "64", "--batch-size", "8", "--no-progress", "--etd", "none", "--cache", "memory",
            "--latency-runs", "1", "--mode", "general", "--max-length", "24", "--epochs", "2"]
    res = train.run(train.parse_config(argv), log=lambda *_: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["loss_ffn_gap"] for r in records if "loss_ffn_gap" in r]
    assert steps and all(math.isfinite(v) and v > 0 for v in steps)
    assert res["cache"][0]["hit_rate"] > 0  # epoch 2 read the new field back from the activation cache


def test_a_method_with_its_own_general_stages_is_one_registration(scratch_registries):
    from fastkd.recipes import Shapes, Stage, build_recipe, register_method
    from fastkd.terms import LossTerm

    @dataclasses.dataclass
    class TwoStage:
        epochs: int = 1
        lr: float = 1e-4

    def last_only(stages):
        return stages[-1:]

    @register_method("two-stage", TwoStage, general=last_only)
    def build(p, shapes):
        return [Stage("a", [LossTerm("hidden_mse", 1.0, [(0, 1)])], p.epochs, p.lr),
                Stage("b", [LossTerm("emb_mse", 1.0), LossTerm("soft_ce", 1.0)], p.epochs, p.lr)]

    recipe = build_recipe("two-stage", Shapes(4, 2, 32, 32, 4, 4), mode="general")
    assert [(s.name, [t.kind for t in s.terms], s.teacher, s.data) for s in recipe.stages] == [
        ("b", ["emb_mse"], "pretrained", "general")]


def test_an_option_in_the_run_identity_is_one_field(tmp_path):
    """identity=True on the field: a --resume that changes it is refused, with nothing else to edit."""
    from fastkd.config import TrainConfig, build_parser, identity_fields, option, positive
    from fastkd.training.checkpoint import check_output_dir, write_run_file

    Extended = dataclasses.make_dataclass(
        "Extended", [("probe_every", int, option(4, "steps between probes", check=positive, identity=True))],
        bases=(TrainConfig,))
    assert "probe_every" in identity_fields(Extended)
    from fastkd.config import run_identity

    first = Extended(probe_every=4)
    write_run_file(tmp_path, run_identity(first), {}, "")
    assert check_output_dir(tmp_path, True, run_identity(first), print) == (tmp_path, True)
    with pytest.raises(ValueError, match=r"settings differ: probe_every \(saved 4, now 8\)"):
        check_output_dir(tmp_path, True, run_identity(Extended(probe_every=8)), print)
    assert build_parser(Extended).parse_args(["--probe-every", "8"]).probe_every == 8


def test_an_encoder_family_is_one_registration(scratch_registries):
    """A family registered in one call (here a second name for BERT's layout) is captured exactly, cut by ETD
    and distilled, through the same code every family goes through."""
    from transformers import BertConfig, BertForSequenceClassification

    from fastkd import Distiller
    from fastkd.etd import extract_student
    from fastkd.models.capture import capture
    from fastkd.models.families import BERT_LAYER_PARAMS, EncoderFamily, family_of, register_family

    class ToyConfig(BertConfig):
        model_type = "toy-bert"

    register_family(EncoderFamily("toy-bert", ("toy-bert",), layer_params=BERT_LAYER_PARAMS))
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(ToyConfig(vocab_size=32, hidden_size=32, num_hidden_layers=4,
                                                      num_attention_heads=4, intermediate_size=64)).eval()
    assert family_of(teacher).name == "toy-bert"
    ids = torch.randint(5, 32, (2, 9))
    with torch.no_grad():
        out, cap = capture(teacher, {"input_ids": ids, "output_hidden_states": True}, qkv="qk")
    assert all(torch.equal(cap.hidden[i], out.hidden_states[i + 1]) for i in range(4))
    student = extract_student(teacher, num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32,
                              strategy="rand").train()
    distiller = Distiller(teacher, student, "tinybert")
    for stage in distiller.stages:
        distiller.set_stage(stage.name)
        loss = distiller(input_ids=ids, labels=torch.tensor([0, 1])).loss
        loss.backward()
        assert torch.isfinite(loss)


def test_a_loss_kind_is_one_registration(scratch_registries):
    from transformers import BertModel

    from fastkd.distill.distiller import DistillModule
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
