"""Static checks over kernels/*.py that no interpreter run on this machine would catch.

Triton before 3.9 (the GPU image has 3.6) types a Python float literal outside fp32's normal range
[2^-126, 2^128) as fp64 and promotes the tensor it meets; one `tl.maximum(a, 1e-38)` made the whole Sinkhorn loop
run in fp64 on such versions. Triton 3.9 (here) treats the literal as weak, so only a source check fails for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py"))
FP32_MIN_NORMAL, FP32_MAX = 2.0 ** -126, (2 - 2 ** -23) * 2.0 ** 127


def _jit_functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def _module_constants(tree: ast.Module) -> dict[str, float]:
    """Module-level NAME = tl.constexpr(<float>) or NAME = <float> (kernels read these as literals)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            for c in ast.walk(node.value):
                if isinstance(c, ast.Constant) and isinstance(c.value, float):
                    out[node.targets[0].id] = c.value
    return out


def _bad(x: float) -> bool:
    return x != 0.0 and not (FP32_MIN_NORMAL <= abs(x) <= FP32_MAX) and abs(x) != float("inf")


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_float_literals_in_jit_code_are_fp32_normals(path):
    tree = ast.parse(path.read_text())
    consts = _module_constants(tree)
    bad = []
    for fn in _jit_functions(tree):
        for node in ast.walk(fn):
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and _bad(node.value):
                bad.append(f"{fn.name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Name) and node.id in consts and _bad(consts[node.id]):
                bad.append(f"{fn.name}:{node.lineno}: {node.id} = {consts[node.id]!r}")
    assert not bad, f"{path.name}: float literals triton < 3.9 would type as fp64: {bad}"


def test_the_check_sees_a_subnormal_literal():
    tree = ast.parse("import triton\n@triton.jit\ndef k(a):\n    return tl.maximum(a, 1e-38)\n")
    fn = next(_jit_functions(tree))
    assert [n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and _bad(n.value)] == [1e-38]
