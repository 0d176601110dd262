"""Write docs/configuration.md from the field comments of coordinator/config.py.

    python scripts/gen_config_docs.py            # (re)write docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 if the file is stale

The comments in config.py are the single source of the configuration reference. This script reads
the source (it imports nothing from the project, so it runs without torch or Ray): `ast` finds the
dataclasses and their fields, `tokenize` finds the comments. A field's meaning is the block of
comment lines directly above it plus the comment trailing its line. A field without either is an
error, so the reference cannot silently miss a meaning.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import sys
import tokenize
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PY = os.path.join(ROOT, "coordinator", "config.py")
OUTPUT = os.path.join(ROOT, "docs", "configuration.md")
COMMAND = "python scripts/gen_config_docs.py"
ROOT_CLASS = "Config"


@dataclass
class Field:
    name: str
    type: str
    default: Optional[str]  # None for a nested section
    doc: str
    section: Optional[str] = None  # the dataclass a nested section or list item is made of
    is_list: bool = False  # a list of `section` items (keys below it are `key[].name`)


def _comments(source: str) -> Tuple[Dict[int, str], Dict[int, str]]:
    """Comment text by line: (comment-only lines, comments trailing code)."""
    alone, trailing = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, col = tok.start
        text = tok.string.lstrip("#").strip()
        if tok.line[:col].strip():
            trailing[row] = text
        else:
            alone[row] = text
    return alone, trailing


def _constants(tree: ast.Module) -> Dict[str, List[str]]:
    """Module-level tuples/lists of strings (e.g. PARALLELISMS), so a comment can name them."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, (tuple, list)) and value \
                    and all(isinstance(v, str) for v in value):
                out[node.targets[0].id] = list(value)
    return out


def _renames(tree: ast.Module) -> Dict[Tuple[str, str], str]:
    """config.py's `_RENAMES` [(section, yaml name, field name)] as {(section, field): yaml}."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_RENAMES" for t in node.targets):
            return {(s, attr): yaml_key for s, yaml_key, attr in ast.literal_eval(node.value)}
    return {}


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(value: Optional[ast.expr], classes: Dict[str, ast.ClassDef]) -> Tuple[str, str]:
    """(default as YAML, nested dataclass name or '') of a field's right-hand side."""
    if value is None:
        return "required", ""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return _default(kw.value, classes)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Name) and factory.id in classes:
                    return "", factory.id
                if isinstance(factory, ast.Name) and factory.id in ("dict", "list"):
                    return ("{}" if factory.id == "dict" else "[]"), ""
                if isinstance(factory, ast.Lambda):
                    return _yaml(ast.literal_eval(factory.body)), ""
        raise ValueError(f"line {value.lineno}: cannot read the default of this field()")
    return _yaml(ast.literal_eval(value)), ""


def _list_item(annotation: str, classes: Dict[str, ast.ClassDef]) -> str:
    m = re.fullmatch(r"(?:List|list)\[(\w+)\]", annotation)
    return m.group(1) if m and m.group(1) in classes else ""


def read_fields(source: str) -> Tuple[Dict[str, List[Field]], Dict[Tuple[str, str], str]]:
    """{dataclass name: its fields with type, default and meaning} and the YAML renames."""
    tree = ast.parse(source)
    alone, trailing = _comments(source)
    constants = _constants(tree)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and any(
        getattr(d, "id", None) == "dataclass" for d in n.decorator_list)}
    out: Dict[str, List[Field]] = {}
    for name, cls in classes.items():
        fields = []
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, row = [], node.lineno - 1
            while row in alone:
                above.insert(0, alone[row])
                row -= 1
            after = [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
            doc = " ".join(above + after)
            if not doc:
                raise ValueError(f"coordinator/config.py:{node.lineno}: {name}.{node.target.id} "
                                 "has no comment; say what it means (and its unit)")
            for const, values in constants.items():
                doc = re.sub(rf"\b{const}\b", ", ".join(f"`{v}`" for v in values), doc)
            annotation = ast.get_source_segment(source, node.annotation)
            default, section = _default(node.value, classes)
            item = _list_item(annotation, classes)
            fields.append(Field(node.target.id, annotation, None if section else default, doc,
                                section or item or None, is_list=bool(item)))
        out[name] = fields
    if ROOT_CLASS not in out:
        raise ValueError(f"coordinator/config.py has no dataclass {ROOT_CLASS}")
    return out, _renames(tree)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _links(text: str) -> str:
    """`docs/x.md` named in a comment becomes a link relative to docs/configuration.md."""
    return re.sub(r"\bdocs/([\w.-]+\.md)\b", r"[\1](\1)", text)


def render(source: str) -> str:
    """The whole of docs/configuration.md for config.py's `source`."""
    classes, renames = read_fields(source)
    lines = [
        "# Configuration reference",
        "",
        f"Generated by `{COMMAND}` from the field comments of `coordinator/config.py`;",
        "do not edit it by hand: change the comments and rerun the script (a test fails when this",
        "file is stale).",
        "",
        "A job is configured by a YAML file of sections (`configs/*.yaml`) plus overrides on the",
        "command line, in OmegaConf's dotlist syntax, applied in order over the file:",
        "",
        "```bash",
        "python -m coordinator run CONFIG key=value [key=value ...]",
        "python -m coordinator run configs/local_cpu.yaml train.steps=500 scaling.min_workers=2",
        "python -m coordinator run configs/local_cpu.yaml checkpoint.uri=s3://bucket/run1 \\",
        "    'train.task_args={classes: 8}' 'chaos.events=[]'",
        "```",
        "",
        "Every key below has a default, so a file names only what it changes. Unknown keys and bad",
        "values stop the run before any Ray process starts, with exit 2 and one line naming the",
        "dotted key, the value and what is allowed (e.g. `config error: train.parallelism='tp':",
        "must be one of ddp, fsdp`). The resolved config is written to `<run.dir>/config.yaml`.",
    ]
    if renames:
        spelt = ", ".join(f"`{s}.{y}` (the field `{a}`)" for (s, a), y in renames.items())
        lines += ["Keys that are Python keywords in config.py are spelt as in YAML here: "
                  + spelt + "."]
    lines.append("")

    def section(cls: str, prefix: str, title: str, doc: str) -> None:
        lines.extend([f"## `{title}`", ""])
        if doc:
            lines.extend([_links(doc[:1].upper() + doc[1:]), ""])
        lines.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
        nested = []
        for f in classes[cls]:
            name = renames.get((prefix, f.name), f.name)
            key = f"{prefix}.{name}"
            if f.section and not f.is_list:
                nested.append((f.section, key, key, f.doc))
                continue
            default = f"`{_cell(f.default)}`" if f.default else ""
            lines.append(f"| `{key}` | `{_cell(f.type)}` | {default} | {_links(_cell(f.doc))} |")
            if f.is_list:
                nested.append((f.section, key + "[]", key + "[]",
                               f"Each item of `{key}` has these keys."))
        lines.append("")
        for sub in nested:
            section(*sub)

    for f in classes[ROOT_CLASS]:
        if not f.section:
            raise ValueError(f"{ROOT_CLASS}.{f.name}: expected a section (a nested dataclass)")
        section(f.section, f.name, f.name, f.doc)
    return "\n".join(lines).rstrip("\n") + "\n"


def generate(config_py: str = CONFIG_PY) -> str:
    with open(config_py, encoding="utf-8") as f:
        return render(f.read())


def is_stale(config_py: str = CONFIG_PY, output: str = OUTPUT) -> bool:
    try:
        with open(output, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        return True
    return current != generate(config_py)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if docs/configuration.md is not what the script would write")
    args = ap.parse_args(argv)
    try:
        if args.check:
            if is_stale():
                print(f"docs/configuration.md is stale: run `{COMMAND}`", file=sys.stderr)
                return 1
            return 0
        text = generate()
    except ValueError as e:  # config.py that the reference cannot be written from
        print(f"gen_config_docs: {e}", file=sys.stderr)
        return 1
    with open(OUTPUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUTPUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
