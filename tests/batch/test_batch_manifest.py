"""The batch manifest (JSON Lines, CSV, datasets) and item planning: no model is loaded here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from step1x_core.batch.manifest import EditItem, ManifestError, read_manifest
from step1x_core.batch.plan import Plan, RunDefaults, plan_item
from step1x_core.pipeline import EditSettings
from step1x_core.release_files import DIT_RELEASE

ROWS = [
    {"id": "a", "image": "cat.png", "instruction": "add a red hat", "seed": 3},
    {"id": "shop/b", "image": "cat.png", "instruction": "make it snow", "cfg": 4.5, "steps": 12},
    {"id": "c", "image": "/abs/cat.png", "instruction": "x", "negative": "blurry", "think": False},
]


def _jsonl(folder: Path, rows: list[dict]) -> Path:
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_json_lines_items_with_paths_from_the_manifest_folder(tmp_path):
    items = read_manifest(_jsonl(tmp_path, ROWS))
    assert [i.id for i in items] == ["a", "shop/b", "c"]
    assert items[0].image == str(tmp_path / "cat.png") and items[2].image == "/abs/cat.png"
    assert items[0].overrides == {"seed": 3}
    assert items[1].overrides == {"cfg": 4.5, "steps": 12}
    assert items[2].overrides == {"negative": "blurry", "think": False}


def test_csv_reads_the_same_items(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text("id,image,instruction,seed,cfg,steps,negative,think\n"
                    "a,cat.png,add a red hat,3,,,,\n"
                    'shop/b,cat.png,"make it snow",,4.5,12,,\n'
                    "c,/abs/cat.png,x,,,,blurry,false\n", encoding="utf-8")
    items = read_manifest(path)
    assert [(i.id, i.image, i.instruction) for i in items] == [
        (i.id, i.image, i.instruction) for i in read_manifest(_jsonl(tmp_path, ROWS))]
    assert items[1].overrides == {"cfg": "4.5", "steps": "12"}  # text, parsed when planned


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_datasets_table_with_images_inside(tmp_path, layout):
    datasets = pytest.importorskip("datasets")
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 40)).save(buffer, format="PNG")
    table = datasets.Dataset.from_dict(
        {"id": ["x", "y"], "image": [buffer.getvalue()] * 2, "instruction": ["make it blue", "make it green"],
         "seed": [1, None]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "instruction": datasets.Value("string"), "seed": datasets.Value("int64")}))
    if layout == "parquet":
        path = tmp_path / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir()
        table.to_parquet(str(path))
        path = path.parent
    else:
        path = tmp_path / "table"
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    items = read_manifest(path)
    assert [i.id for i in items] == ["x", "y"] and items[0].overrides == {"seed": 1} and items[1].overrides == {}
    assert Image.open(io.BytesIO(items[0].image)).size == (20, 10)
    assert items[0].image_label.startswith("<image in the manifest, sha256 ")


@pytest.mark.parametrize("rows, fragment", [
    (['{"id": "a", "image": "x.png", "instruction": "y"}', "{not json"], "line 2: not valid JSON"),
    (['{"id": "a", "image": "x.png"}'], "line 1: missing instruction"),
    (['{"id": "a", "image": "x.png", "instruction": "y"}', '{"id": "a", "image": "z.png", "instruction": "w"}'],
     "id 'a' already used at edits.jsonl line 1"),
    (['{"id": "../escape", "image": "x.png", "instruction": "y"}'], "no '..'"),
    (['{"id": "results", "image": "x.png", "instruction": "y"}'], "reserved"),
    (['{"id": "a", "image": 5, "instruction": "y"}'], "image must be text"),
    (['["a", "b"]'], "expected a JSON object"),
])
def test_unusable_manifests_are_named_before_anything_runs(tmp_path, rows, fragment):
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert fragment in str(err.value)


def test_unknown_format_and_missing_header(tmp_path):
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(tmp_path / "m.txt")
    (tmp_path / "m.csv").write_text("id,picture,instruction\n")
    with pytest.raises(ManifestError, match="header lacks image"):
        read_manifest(tmp_path / "m.csv")


# ---- planning ----------------------------------------------------------------------------------------

def _defaults(tmp_path: Path, **kw) -> RunDefaults:
    return RunDefaults(EditSettings(steps=4, size_level=64), tmp_path / "dit.safetensors", **kw)


def test_overrides_replace_the_command_line_settings(tmp_path):
    item = EditItem("a", "cat.png", "x", {"seed": "42", "cfg": "4.5", "steps": 12, "negative": "blurry",
                                          "size_level": 512, "think": "false"})
    plan = plan_item(item, _defaults(tmp_path))
    assert (plan.settings.seed, plan.settings.cfg_scale, plan.settings.steps, plan.settings.negative,
            plan.settings.size_level) == (42, 4.5, 12, "blurry", 512)
    assert plan.settings_used()["dit"] == "dit.safetensors" and plan.settings_used()["version"] == "auto"
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_travels_with_image_bytes(tmp_path):
    plan = plan_item(EditItem("a", b"\x89PNG...", "x"), _defaults(tmp_path))
    assert json.loads(plan.to_json())["image"] is None
    assert Plan.from_json(plan.to_json(), b"\x89PNG...") == plan


@pytest.mark.parametrize("overrides, fragment", [
    ({"seed": "abc"}, "seed must be a whole number"),
    ({"seed": -1}, "seed: must be between 0 and 2**64 - 1"),
    ({"steps": 0}, "steps must be between 1 and 1000"),
    ({"cfg": "nan"}, "cfg: must be a finite number"),
    ({"version": "v2.0"}, "unknown Step1X-Edit version 'v2.0'"),
    ({"think": "maybe"}, "think must be true or false"),
    ({"reflect": "maybe"}, "reflect must be true, false or a number of rounds"),
    ({"reflect": -1}, "reflect must be between 0 (off) and 10 rounds"),
    ({"reflect": 1000}, "reflect must be between 0 (off) and 10 rounds (the reference: 3), got 1000"),
    ({"steps": 100000}, "steps must be between 1 and 1000"),
    ({"size_level": 100000}, "size_level must be between 16 and 4096"),
])
def test_bad_values_are_the_items_error(tmp_path, overrides, fragment):
    with pytest.raises(ValueError) as err:
        plan_item(EditItem("a", "cat.png", "x", overrides), _defaults(tmp_path))
    assert fragment in str(err.value)


def test_version_picks_that_versions_dit_from_the_models_folder(tmp_path):
    dits = tmp_path / "diffusion_models"
    dits.mkdir()
    (dits / DIT_RELEASE["v1.0"]).touch()
    defaults = _defaults(tmp_path, models_dir=tmp_path)
    plan = plan_item(EditItem("a", "cat.png", "x", {"version": "v1.0"}), defaults)
    assert plan.dit == str(dits / DIT_RELEASE["v1.0"]) and plan.version == "v1.0"
    with pytest.raises(ValueError, match="step1x-edit-v1p1-official.safetensors is not in"):
        plan_item(EditItem("a", "cat.png", "x", {"version": "v1.1"}), defaults)
    # Without a models folder the one DiT given runs as the version asked (as --version does).
    plan = plan_item(EditItem("a", "cat.png", "x", {"version": "v1.0"}), _defaults(tmp_path))
    assert plan.dit == str(tmp_path / "dit.safetensors") and plan.version == "v1.0"


@pytest.mark.parametrize("overrides, think, reflect", [
    ({"think": True}, True, 0), ({"think": "yes", "reflect": 2}, True, 2), ({"reflect": "true"}, False, 3),
    ({"reflect": "false"}, False, 0), ({}, False, 0)])
def test_v12_reasoning_columns_become_settings(tmp_path, overrides, think, reflect):
    """think/reflect enter the item's settings (reflect: rounds, or true for the reference's 3); an item whose
    DiT is not v1.2 fails at edit time with the pipeline's message."""
    from step1x_core.batch.plan import asks_for_reasoning

    plan = plan_item(EditItem("a", "cat.png", "x", overrides), _defaults(tmp_path))
    assert (plan.settings.think, plan.settings.reflect) == (think, reflect)
    assert asks_for_reasoning([EditItem("a", "cat.png", "x", overrides)]) == (think or reflect > 0)
