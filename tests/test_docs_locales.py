"""Node help pages (web/docs) and translations (locales/) cover every node, input and output.

The node schemas are read from the source of `nodes/*.py` with `ast` (no import: the nodes need
ComfyUI). What ComfyUI reads, and so what is checked here:

- help pages: the frontend fetches `/extensions/<pack>/docs/<NodeId>/<locale>.md` and falls back to
  `/extensions/<pack>/docs/<NodeId>.md`; `/extensions/<pack>/` serves the pack's `WEB_DIRECTORY`.
- translations: ComfyUI's `/i18n` route merges `locales/<lang>/main.json` and `nodeDefs.json` (as
  the `nodeDefs` key); the frontend looks up `nodeDefs.<NodeId>.display_name`, `.description`,
  `.inputs.<input name>.name|tooltip` and `.outputs.<output index>.name|tooltip`.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODES_DIR = ROOT / "nodes"
LOCALES = ROOT / "locales"
LANGS = ("en", "zh")
# vue-i18n message syntax: these characters would be parsed (interpolation, linked messages, plurals).
I18N_SPECIAL = re.compile(r"[{}@|]")
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class Port:
    id: str | None
    tooltip: str | None  # None when absent or not a plain string literal
    display_name: str | None = None  # the label the frontend shows, when it differs from the id


@dataclass
class NodeSchema:
    node_id: str
    display_name: str | None
    description: str | None
    inputs: list[Port] = field(default_factory=list)
    outputs: list[Port] = field(default_factory=list)


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _ports(call: ast.Call, name: str) -> list[Port]:
    value = _keyword(call, name)
    if value is None:
        return []
    assert isinstance(value, ast.List), f"{name}= of a Schema is not a list literal; this test cannot read it"
    ports = []
    for item in value.elts:
        assert isinstance(item, ast.Call), f"an entry of {name}= is not an Input/Output call"
        ports.append(Port(_literal(item.args[0]) if item.args else _literal(_keyword(item, "id")),
                          _literal(_keyword(item, "tooltip")), _literal(_keyword(item, "display_name"))))
    return ports


def _schemas_by_class() -> dict[str, NodeSchema]:
    """Class name -> the io.Schema(...) built in that class, for every class in nodes/*.py."""
    found = {}
    for path in sorted(NODES_DIR.glob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(cls, ast.ClassDef):
                continue
            for call in ast.walk(cls):
                if (isinstance(call, ast.Call) and isinstance(call.func, (ast.Attribute, ast.Name))
                        and getattr(call.func, "attr", getattr(call.func, "id", None)) == "Schema"):
                    node_id = _literal(_keyword(call, "node_id"))
                    assert node_id, f"{path.name}: {cls.name} has a Schema without a literal node_id"
                    found[cls.name] = NodeSchema(node_id, _literal(_keyword(call, "display_name")),
                                                 _literal(_keyword(call, "description")),
                                                 _ports(call, "inputs"), _ports(call, "outputs"))
    return found


def _registered_classes() -> list[str]:
    """The class names in the NODES list of nodes/__init__.py (what the extension registers)."""
    tree = ast.parse((NODES_DIR / "__init__.py").read_text(encoding="utf-8"))
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NODES" for t in stmt.targets):
            assert isinstance(stmt.value, ast.List)
            return [elt.id for elt in stmt.value.elts if isinstance(elt, ast.Name)]
    raise AssertionError("nodes/__init__.py has no NODES = [...] list")


def _node_schemas() -> list[NodeSchema]:
    by_class = _schemas_by_class()
    classes = _registered_classes()
    missing = [name for name in classes if name not in by_class]
    assert not missing, f"classes in NODES without an io.Schema in nodes/*.py: {missing}"
    return [by_class[name] for name in classes]


SCHEMAS = _node_schemas()
NODE_IDS = [schema.node_id for schema in SCHEMAS]


def _web_directory() -> Path:
    """The pack's WEB_DIRECTORY (from the root __init__.py), the folder ComfyUI serves as /extensions/<pack>/."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "WEB_DIRECTORY" for t in stmt.targets):
            value = _literal(stmt.value)
            assert value, "WEB_DIRECTORY is not a string literal"
            return (ROOT / value).resolve()
    raise AssertionError("the pack's __init__.py defines no WEB_DIRECTORY: ComfyUI would serve no help pages")


DOCS = _web_directory() / "docs"


def _load(lang: str) -> dict:
    path = LOCALES / lang / "nodeDefs.json"
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, dict)
    return data


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    else:
        yield value


def test_the_source_parse_finds_the_nodes():
    assert len(SCHEMAS) >= 7, NODE_IDS
    assert len(set(NODE_IDS)) == len(NODE_IDS), f"duplicate node ids: {NODE_IDS}"
    for schema in SCHEMAS:
        assert schema.inputs, f"{schema.node_id}: no inputs parsed"
        assert schema.outputs, f"{schema.node_id}: no outputs parsed"
        assert all(port.id for port in schema.inputs), f"{schema.node_id}: an input without a literal id"


@pytest.mark.parametrize("schema", SCHEMAS, ids=NODE_IDS)
@pytest.mark.parametrize("page", ["{id}.md", "{id}/zh.md"], ids=["en", "zh"])
def test_help_page_exists_and_names_every_input(schema: NodeSchema, page: str):
    path = DOCS / page.format(id=schema.node_id)
    assert path.is_file(), f"missing help page {path.relative_to(ROOT)}"
    text = path.read_text(encoding="utf-8")
    assert text.strip(), f"{path.relative_to(ROOT)} is empty"
    assert text.lstrip().startswith("# "), f"{path.relative_to(ROOT)} does not start with a title"
    missing = [port.id for port in schema.inputs if f"`{port.id}`" not in text]
    assert not missing, f"{path.relative_to(ROOT)} does not mention input(s) {missing}"
    if page.endswith("zh.md"):
        assert CJK.search(text), f"{path.relative_to(ROOT)} has no Chinese text"


def test_help_pages_are_only_for_known_nodes():
    """A page whose node id is misspelt is never shown: the frontend asks for the exact id."""
    names = {p.stem for p in DOCS.glob("*.md")} | {p.parent.name for p in DOCS.glob("*/*.md")}
    unknown = sorted(names - set(NODE_IDS))
    assert not unknown, f"help pages for node ids that do not exist: {unknown}"


@pytest.mark.parametrize("lang", LANGS)
def test_locale_covers_every_node_input_and_output(lang: str):
    data = _load(lang)
    assert set(data) == set(NODE_IDS), (f"locales/{lang}/nodeDefs.json: missing {set(NODE_IDS) - set(data)}, "
                                        f"unknown {set(data) - set(NODE_IDS)}")
    for schema in SCHEMAS:
        entry = data[schema.node_id]
        where = f"locales/{lang}/nodeDefs.json {schema.node_id}"
        for key in ("display_name", "description"):
            assert isinstance(entry.get(key), str) and entry[key].strip(), f"{where}: no {key}"
        inputs = entry.get("inputs", {})
        for port in schema.inputs:
            item = inputs.get(port.id)
            assert isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip(), \
                f"{where}: input {port.id} has no name"
            if port.tooltip is not None:
                assert isinstance(item.get("tooltip"), str) and item["tooltip"].strip(), \
                    f"{where}: input {port.id} has no tooltip"
        unknown = set(inputs) - {port.id for port in schema.inputs} - {"control_after_generate"}
        assert not unknown, f"{where}: unknown inputs {unknown}"
        outputs = entry.get("outputs", {})
        assert set(outputs) == {str(i) for i in range(len(schema.outputs))}, \
            f"{where}: outputs must be keyed by index 0..{len(schema.outputs) - 1}, got {sorted(outputs)}"
        for index, port in enumerate(schema.outputs):
            item = outputs[str(index)]
            if port.tooltip is not None:
                assert isinstance(item.get("tooltip"), str) and item["tooltip"].strip(), \
                    f"{where}: output {index} has no tooltip"
            if port.id is not None:
                assert isinstance(item.get("name"), str) and item["name"].strip(), \
                    f"{where}: output {index} ({port.id}) has no name"
        for text in _strings(entry):
            assert isinstance(text, str), f"{where}: non-string value {text!r}"
            assert not I18N_SPECIAL.search(text), f"{where}: vue-i18n would parse a special character in {text!r}"


def test_english_locale_equals_the_node_source():
    data = _load("en")
    for schema in SCHEMAS:
        entry = data[schema.node_id]
        where = f"locales/en/nodeDefs.json {schema.node_id}"
        if schema.display_name is not None:
            assert entry["display_name"] == schema.display_name, where
        if schema.description is not None:
            assert entry["description"] == schema.description, where
        for port in schema.inputs:
            assert entry["inputs"][port.id]["name"] == (port.display_name or port.id), f"{where}: input {port.id}"
            if port.tooltip is not None:
                assert entry["inputs"][port.id]["tooltip"] == port.tooltip, f"{where}: input {port.id} tooltip"
        for index, port in enumerate(schema.outputs):
            item = entry["outputs"][str(index)]
            if port.id is not None:  # the label shown, as for inputs
                assert item["name"] == (port.display_name or port.id), f"{where}: output {index}"
            if port.tooltip is not None:
                assert item["tooltip"] == port.tooltip, f"{where}: output {index} tooltip"


def test_chinese_locale_mirrors_english_and_is_translated():
    en, zh = _load("en"), _load("zh")
    for node_id in NODE_IDS:
        where = f"locales/zh/nodeDefs.json {node_id}"
        for section in ("inputs", "outputs"):
            assert set(zh[node_id].get(section, {})) == set(en[node_id].get(section, {})), f"{where}: {section}"
            for key, item in en[node_id].get(section, {}).items():
                assert set(zh[node_id][section][key]) == set(item), f"{where}: {section}.{key} fields"
                if "tooltip" in item:
                    assert CJK.search(zh[node_id][section][key]["tooltip"]), f"{where}: {section}.{key} untranslated"
        for key in ("display_name", "description"):
            assert CJK.search(zh[node_id][key]), f"{where}: {key} is not translated"
