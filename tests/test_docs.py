"""The docs: the generated configuration reference is current and complete, the README stays
short, and no relative link points at nothing."""

import dataclasses
import glob
import importlib.util
import os
import re
import sys
import typing

import pytest

from coordinator import config as config_module
from coordinator.config import Config

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 200


def _generator():
    path = os.path.join(ROOT, "scripts", "gen_config_docs.py")
    spec = importlib.util.spec_from_file_location("gen_config_docs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its @dataclass looks the module up there
    spec.loader.exec_module(module)
    return module


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_configuration_reference_is_up_to_date():
    gen = _generator()
    assert not gen.is_stale(), f"docs/configuration.md is stale: run `{gen.COMMAND}`"


def _dotted_keys(cls: type, prefix: str = ""):
    """Every field of the dataclass tree under `cls`, in YAML spelling: `scaling.min_workers`,
    `checkpoint.async`, `chaos.events` and `chaos.events[].at_step`."""
    hints = typing.get_type_hints(cls, vars(config_module))
    for f in dataclasses.fields(cls):
        key = config_module._user_key(f"{prefix}{f.name}")
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _dotted_keys(hint, key + ".")
            continue
        yield key
        items = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if typing.get_origin(hint) is list and items:
            yield from _dotted_keys(items[0], key + "[].")


def test_every_config_field_is_in_the_reference():
    text = _read(os.path.join(ROOT, "docs", "configuration.md"))
    keys = list(_dotted_keys(Config))
    assert "checkpoint.async" in keys and "chaos.events[].target" in keys  # the walk itself
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}: rerun scripts/gen_config_docs.py"


def test_readme_stays_short():
    n = len(_read(README).splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): " \
        "move the detail to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str):
    seen = {}
    for line in _strip_fences(text).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            yield slug if n == 0 else f"{slug}-{n}"


def _strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _strip_code(text: str) -> str:
    """The text without code blocks and inline code, whose brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    text = _read(path)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _strip_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: and the like
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
            else path
        if not os.path.exists(dest):
            broken.append(target)
        elif anchor and dest.endswith(".md") and anchor not in set(_anchors(_read(dest))):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)}: links to nothing: {broken}"
