"""`step1x_core.commands.download`: planned destinations, skipping, offline errors, the CLI. Never touches the network."""

from __future__ import annotations

import fnmatch
import socket
import sys
from pathlib import Path

import pytest

from step1x_core.commands import download
from step1x_core.commands.download import DownloadError, download_models, main, plan_downloads
from tests.release_names import QWEN_FILE, QWEN_FOLDER as QWEN, QWEN_FP8_FILE, STEPFUN_VAE, V10_DIT, V11_DIT, VAE

UNROUTABLE = "http://127.0.0.1:9"  # the discard port on loopback: nothing answers


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline Hub, an endpoint nobody listens on, and no internet sockets at all."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", UNROUTABLE)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        import huggingface_hub.constants as constants
    except ImportError:
        constants = None
    if constants is not None:  # read from the environment at import time, so patch them too
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "ENDPOINT", UNROUTABLE, raising=False)
    real_connect = socket.socket.connect

    def refuse_internet(sock, address, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise ConnectionRefusedError(f"network disabled in tests (tried {address})")
        return real_connect(sock, address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse_internet)


@pytest.fixture
def models_dir(tmp_path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def fake_hub(monkeypatch):
    """The real huggingface_hub module with its network calls replaced by recorders."""
    hub = pytest.importorskip("huggingface_hub")
    calls: list[tuple] = []

    def hf_hub_download(repo_id, filename, *, local_dir, token=None, **kwargs):
        calls.append(("file", repo_id, filename, Path(local_dir), token))
        target = Path(local_dir) / filename
        target.write_bytes(b"w" * 10)
        return str(target)

    def snapshot_download(repo_id, *, allow_patterns, local_dir, token=None, **kwargs):
        calls.append(("folder", repo_id, tuple(allow_patterns), Path(local_dir), token))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "config.json").write_bytes(b"{}")
        return str(local_dir)

    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


# ---------------------------------------------------------------------------------------------
# planning


def test_plan_v11_puts_each_release_file_in_its_comfyui_folder(models_dir):
    plan = plan_downloads(models_dir)  # defaults: v1.1, all three roles

    assert [(p.role, p.repo, p.source, p.destination) for p in plan] == [
        ("dit", "stepfun-ai/Step1X-Edit", V11_DIT, models_dir / "diffusion_models" / V11_DIT),
        ("text_encoder", "Qwen/Qwen2.5-VL-7B-Instruct", " ".join(download.QWEN_PATTERNS),
         models_dir / "text_encoders" / QWEN),
        ("vae", "stepfun-ai/Step1X-Edit", STEPFUN_VAE, models_dir / "vae" / STEPFUN_VAE),
    ]
    qwen = plan[1]
    assert qwen.is_folder and qwen.filename is None
    for needed in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "preprocessor_config.json", "chat_template.json", "model.safetensors.index.json",
                   "model-00001-of-00005.safetensors"):
        assert any(fnmatch.fnmatch(needed, p) for p in qwen.allow_patterns), needed
    assert not any(fnmatch.fnmatch("README.md", p) for p in qwen.allow_patterns)


def test_plan_v10_takes_the_i1258_dit(models_dir):
    (dit,) = plan_downloads(models_dir, version="v1.0", include=("dit",))
    assert (dit.repo, dit.filename, dit.destination) == (
        "stepfun-ai/Step1X-Edit", V10_DIT, models_dir / "diffusion_models" / V10_DIT)


@pytest.mark.parametrize("only, roles", [(("dit",), ["dit"]), (("vae", "text_encoder"), ["vae", "text_encoder"]),
                                         (("vae", "vae"), ["vae"])])
def test_plan_only_selected_roles(models_dir, only, roles):
    assert [p.role for p in plan_downloads(models_dir, include=only)] == roles


@pytest.mark.parametrize("kwargs", [{"version": "v2.0"}, {"include": ("unet",)}, {"include": ()}])
def test_plan_rejects_unknown_versions_and_roles(models_dir, kwargs):
    with pytest.raises(ValueError):
        plan_downloads(models_dir, **kwargs)


def test_flux_ae_present_skips_the_vae(models_dir, fake_hub, monkeypatch):
    ae = write(models_dir / "vae" / VAE, 16)
    assert [p.role for p in plan_downloads(models_dir)] == ["dit", "text_encoder"]

    paths = download_models(models_dir, include=("dit", "vae"))

    assert paths == [models_dir / "diffusion_models" / V11_DIT, ae]
    assert fake_hub == [("file", "stepfun-ai/Step1X-Edit", V11_DIT, models_dir / "diffusion_models", None)]
    assert not (models_dir / "vae" / STEPFUN_VAE).exists()


@pytest.mark.parametrize("name", [QWEN_FP8_FILE, QWEN_FILE])
def test_comfyui_qwen_file_present_skips_the_qwen_folder(models_dir, fake_hub, monkeypatch, name):
    """Qwen-Image users already have Qwen2.5-VL-7B as one file: no second 16 GB download."""
    qwen_file = write(models_dir / "text_encoders" / name, 16)
    assert [p.role for p in plan_downloads(models_dir)] == ["dit", "vae"]

    assert download_models(models_dir, include=("text_encoder",)) == [qwen_file]
    assert fake_hub == [] and not (models_dir / "text_encoders" / QWEN).exists()


# ---------------------------------------------------------------------------------------------
# downloading (huggingface_hub's download functions replaced)


def test_each_planned_item_is_one_local_dir_download(models_dir, fake_hub):
    """huggingface_hub decides what is up to date and resumes partial files; we give it the right
    repository, files and folder, and the token."""
    paths = download_models(models_dir, token="hf_test")

    qwen = models_dir / "text_encoders" / QWEN
    assert paths == [models_dir / "diffusion_models" / V11_DIT, qwen, models_dir / "vae" / STEPFUN_VAE]
    assert fake_hub == [
        ("file", "stepfun-ai/Step1X-Edit", V11_DIT, models_dir / "diffusion_models", "hf_test"),
        ("folder", "Qwen/Qwen2.5-VL-7B-Instruct", download.QWEN_PATTERNS, qwen, "hf_test"),
        ("file", "stepfun-ai/Step1X-Edit", STEPFUN_VAE, models_dir / "vae", "hf_test"),
    ]


def test_models_dir_must_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        download_models(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# offline (the real huggingface_hub, offline mode, no sockets)


def test_offline_error_names_every_file_its_folder_and_the_manual_commands(models_dir):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(DownloadError) as caught:
        download_models(models_dir)
    message = str(caught.value)

    assert "could not be fetched" in message
    assert "\n" not in message
    for name, repo, folder in ((V11_DIT, "stepfun-ai/Step1X-Edit", models_dir / "diffusion_models"),
                               (QWEN, "Qwen/Qwen2.5-VL-7B-Instruct", models_dir / "text_encoders" / QWEN),
                               (STEPFUN_VAE, "stepfun-ai/Step1X-Edit", models_dir / "vae")):
        assert name in message and repo in message and f"{folder}/" in message
    assert f"hf download stepfun-ai/Step1X-Edit {V11_DIT} --local-dir {models_dir / 'diffusion_models'}" in message
    assert (f"hf download Qwen/Qwen2.5-VL-7B-Instruct --include '*.json' '*.jinja' merges.txt '*.safetensors' "
            f"--local-dir {models_dir / 'text_encoders' / QWEN}") in message
    assert "huggingface-cli download" in message


def test_offline_keeps_files_that_are_already_there(models_dir):
    pytest.importorskip("huggingface_hub")
    dit = write(models_dir / "diffusion_models" / V10_DIT, 4)
    qwen = models_dir / "text_encoders" / QWEN
    write(qwen / "config.json", 2)
    (qwen / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    write(qwen / "model-1.safetensors", 4)

    # huggingface_hub's own offline fallback: what is there is kept, and nothing fails.
    assert download_models(models_dir, version="v1.0", include=("dit", "text_encoder")) == [dit, qwen]
    assert dit.read_bytes() == b"x" * 4


def test_offline_error_lists_only_what_is_still_needed(models_dir):
    pytest.importorskip("huggingface_hub")
    write(models_dir / "diffusion_models" / V11_DIT, 4)
    with pytest.raises(DownloadError) as caught:
        download_models(models_dir, include=("dit", "vae"))
    message = str(caught.value)
    assert STEPFUN_VAE in message and V11_DIT not in message


def test_missing_huggingface_hub_says_how_to_install_it(models_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now fails
    with pytest.raises(DownloadError, match=r'pip install "step1x-edit\[download\]"'):
        download_models(models_dir)


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_offline_exits_2_with_one_stderr_line(models_dir, capsys):
    pytest.importorskip("huggingface_hub")
    assert main(["--models-dir", str(models_dir), "--only", "dit"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("step1x-edit-download: error: ")
    assert V11_DIT in lines[0] and "hf download" in lines[0]
    assert captured.out == ""


def test_cli_without_huggingface_hub_exits_2_with_one_stderr_line(models_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["--models-dir", str(models_dir)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and 'pip install "step1x-edit[download]"' in lines[0]


def test_cli_passes_version_only_and_token(models_dir, capsys, monkeypatch):
    seen = {}

    def fake_download(path, version, include, token=None):
        seen.update(path=path, version=version, include=include, token=token)
        return [path / "x.safetensors"]

    monkeypatch.setattr(download, "download_models", fake_download)
    argv = ["--models-dir", str(models_dir), "--version", "v1.0", "--only", "dit", "--only", "vae", "--token", "t"]
    assert main(argv) == 0
    assert seen == {"path": models_dir, "version": "v1.0", "include": ("dit", "vae"), "token": "t"}
    assert capsys.readouterr().out.strip() == f"ready: {models_dir / 'x.safetensors'}"


def test_cli_defaults_to_v11_and_all_roles(models_dir, monkeypatch):
    seen = {}
    monkeypatch.setattr(download, "download_models",
                        lambda path, version, include, token=None: seen.update(v=version, i=include) or [])
    assert main(["--models-dir", str(models_dir)]) == 0
    assert seen == {"v": "v1.1", "i": ("dit", "text_encoder", "vae")}


def test_cli_rejects_a_bad_only_with_exit_2(models_dir, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--models-dir", str(models_dir), "--only", "unet"])
    assert caught.value.code == 2


def test_v12_fetches_its_released_folders_as_published(models_dir, fake_hub):
    """v1.2 ships diffusers folders: transformer/ and its own text_encoder/ land under Step1X-Edit-v1p2/ in
    the ComfyUI folders, where the loaders list them; the VAE is FLUX's as for every version."""
    plan = plan_downloads(models_dir, version="v1.2")
    release = "stepfun-ai/Step1X-Edit-v1p2"
    assert [(p.role, p.repo, p.allow_patterns, p.destination) for p in plan[:2]] == [
        ("dit", release, ("transformer/*",), models_dir / "diffusion_models" / "Step1X-Edit-v1p2" / "transformer"),
        ("text_encoder", release, ("text_encoder/*",),
         models_dir / "text_encoders" / "Step1X-Edit-v1p2" / "text_encoder")]
    write(models_dir / "text_encoders" / QWEN_FILE, 16)  # the stock encoder does not do for v1.2
    download_models(models_dir, version="v1.2", include=("dit", "text_encoder"))
    assert fake_hub == [("folder", release, ("transformer/*",), models_dir / "diffusion_models" / "Step1X-Edit-v1p2",
                         None),
                        ("folder", release, ("text_encoder/*",), models_dir / "text_encoders" / "Step1X-Edit-v1p2",
                         None)]
    assert "--local-dir" in plan[0].manual_command() and "Step1X-Edit-v1p2" in plan[0].manual_command()
