"""The version as one typed value: parsed once, asked instead of compared."""

from __future__ import annotations

import pytest

from step1x_core.dit.loading import load_dit
from step1x_core.dit.params import DiTParams
from step1x_core.testing.tiny_dit import write_tiny_dit
from step1x_core.versions import VERSIONS, Version


def test_a_version_reads_and_prints_as_users_write_it():
    assert Version.V1_1 == "v1.1" and str(Version.V1_0) == "v1.0" and f"{Version.V1_1}" == "v1.1"
    assert VERSIONS == ("v1.0", "v1.1", "v1.2")
    assert Version.parse("v1.0") is Version.V1_0 and Version.parse(Version.V1_1) is Version.V1_1


def test_behaviours_that_differ():
    assert Version.V1_0.has_connector_scale_factor and not Version.V1_1.has_connector_scale_factor
    assert Version.V1_0.reference_offset == (0, 0, 0) and Version.V1_1.reference_offset == (1, 1, 1)
    assert Version.V1_2.reference_offset == (1, 0, 0) and Version.V1_2.has_text_token_mapping
    assert Version.V1_2.reasoning_prompts and not Version.V1_1.reasoning_prompts


@pytest.mark.parametrize("bad", ["1.1", "v2", "V1.1", ""])
def test_unknown_versions_are_named_with_the_choices(bad):
    with pytest.raises(ValueError, match=rf"unknown Step1X-Edit version {bad!r}: choose v1.0, v1.1 or v1.2"):
        Version.parse(bad)
    with pytest.raises(ValueError, match="unknown Step1X-Edit version"):
        DiTParams(version=bad)


def test_params_hold_the_typed_value():
    assert DiTParams(version="v1.1").version is Version.V1_1


def test_a_mistyped_version_is_named_before_the_file_is_read(tmp_path):
    path = write_tiny_dit(tmp_path / "dit.safetensors", "v1.1")
    with pytest.raises(ValueError, match="unknown Step1X-Edit version 'v1.2.3'") as info:
        load_dit(path, version="v1.2.3")
    assert "inconsistent" not in str(info.value)
    assert load_dit(path, version="v1.1").connector.has_scale_factor is False
