"""The package's layering (docs/design.md), checked on the source."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_dpscale"


def imported_modules(path):
    """The modules that a source file imports (absolute names)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [
                f"{node.module}.{alias.name}" for alias in node.names
            ]
    return names


def sources(folder=PACKAGE):
    return sorted(folder.rglob("*.py"))


def test_importing_data_loads_neither_the_model_nor_the_engines():
    code = (
        "import sys, keras_dpscale.data; "
        "print(' '.join(m for m in sys.modules if m.startswith('keras_dpscale')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    ).stdout.split()
    assert "keras_dpscale.data" in out
    for forbidden in (
        "keras_dpscale.dp_model",
        "keras_dpscale.engines",
        "keras_dpscale.rules",
        "keras_dpscale.optimizers",
        "keras_dpscale.models",
        "keras_dpscale.layers",
    ):
        assert forbidden not in out, f"{forbidden} loaded by keras_dpscale.data"


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        (
            "data",
            ("dp_model", "engines", "rules", "models", "layers", "optimizers"),
        ),
        ("engines", ("dp_model", "models", "layers", "optimizers", "data")),
        (
            "rules",
            ("dp_model", "models", "layers", "optimizers", "data", "engines"),
        ),
    ],
)
def test_lower_layers_do_not_import_upper_ones(folder, forbidden):
    for path in sources(PACKAGE / folder):
        for name in imported_modules(path):
            for upper in forbidden:
                assert not name.startswith(f"keras_dpscale.{upper}"), (
                    f"{path.relative_to(PACKAGE)} imports {name}"
                )


def test_private_keras_and_tensorflow_only_through_the_compat_shims():
    for path in sources():
        if path.parent.name == "_compat":
            continue
        for name in imported_modules(path):
            assert not name.startswith(("keras.src", "tensorflow.python")), (
                f"{path.relative_to(PACKAGE)} imports {name}; use "
                "keras_dpscale._compat"
            )


def test_no_module_imports_another_modules_private_names():
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.module or ""
            ).startswith("keras_dpscale"):
                for alias in node.names:
                    assert not alias.name.startswith("_"), (
                        f"{path.relative_to(PACKAGE)} imports "
                        f"{node.module}.{alias.name}"
                    )


def test_no_class_over_300_lines_and_no_function_over_120():
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                limit = 300 if isinstance(node, ast.ClassDef) else 120
                assert length <= limit, (
                    f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                    f"has {length} lines"
                )
