"""The generated "Built-in types" reference: complete, correct, and current in README.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, cast

import attrs
import pytest

from castore_di.composition import BlobServiceConfig, reference
from castore_di.composition.docs import BEGIN, END, builtin_registry, field_docs, render_types, replace_section

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_current() -> None:
    """Fails when a config class changed without ``python scripts/gen_config_docs.py``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert replace_section(readme, render_types()) == readme, "README.md is stale: run python scripts/gen_config_docs.py"


def test_check_script_detects_staleness(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_every_builtin_type_and_field_is_documented() -> None:
    registry = builtin_registry()
    rendered = render_types(registry)
    for kind in ("blobservices", "directoryservices"):
        for tag in registry.tags(kind):
            cls = registry.resolve(kind, tag)
            assert f"#### `{tag}` ({kind})" in rendered
            for field in attrs.fields(cast(Any, cls)):
                assert f"| `{field.name}` |" in rendered


def test_every_builtin_url_form_is_documented() -> None:
    """A built-in ``from_url`` has a docstring, so the README shows its URL form, not the generic text."""
    from castore_di.composition.config import ServiceConfig

    registry = builtin_registry()
    for kind in ("blobservices", "directoryservices"):
        for tag in registry.tags(kind):
            cls = registry.resolve(kind, tag)
            if cls.from_url.__func__ is ServiceConfig.from_url.__func__:  # type: ignore[attr-defined]
                continue  # no URL form
            assert (cls.from_url.__doc__ or "").strip(), f"{kind}.{tag}: from_url has no docstring"
    rendered = render_types(registry)
    assert "URL form: scheme `" not in rendered


@attrs.frozen(kw_only=True)
class _Documented(BlobServiceConfig):
    """A config class documenting its fields in all three ways.

    Attributes:
        from_section: documented in the
            class docstring.
        both: the section loses to the attribute docstring.
    """

    type_tag: ClassVar[str] = "documented"
    target: str = reference("blobservices", doc="from metadata")
    from_section: int = 3
    both: bool = False
    """from the attribute docstring"""
    plain: str | None = None

    def build(self) -> None:
        return None


def test_field_docs_sources() -> None:
    assert field_docs(_Documented) == {
        "target": "from metadata",
        "from_section": "documented in the class docstring.",
        "both": "from the attribute docstring",
        "plain": "",
    }


def test_rendering_of_a_type() -> None:
    from castore_di.composition import Registry

    registry = Registry()
    registry.register("blobservices", "documented", _Documented)
    rendered = render_types(registry)
    assert "| `target` | reference to blobservices (name or URL) | required | from metadata |" in rendered
    assert "| `from_section` | `int` | `3` | documented in the class docstring. |" in rendered
    assert "| `plain` | `str \\| null` | `null` |  |" in rendered
    assert "URL form: none" in rendered


def test_replace_section() -> None:
    doc = f"a\n{BEGIN}\nold\n{END}\nb\n"
    assert replace_section(doc, "new\n") == f"a\n{BEGIN}\nnew\n{END}\nb\n"
    with pytest.raises(ValueError):
        replace_section("no markers", "x")
