"""`step1x-edit-download`: fetch the released model files into a ComfyUI `models/` folder.

    step1x-edit-download --models-dir ComfyUI/models                   # v1.1 DiT, Qwen2.5-VL, VAE
    step1x-edit-download --models-dir ComfyUI/models --version v1.0 --only dit
    step1x-edit-download --models-dir ComfyUI/models --version v1.2   # v1.2's transformer/ and text_encoder/

Files land in the sub-folders and under the release names of `files.py`, so the loaders find them.
Downloading is huggingface_hub's: its progress bars, its up-to-date checks and resume of partial
downloads (kept under `<folder>/.cache/huggingface/`), its offline fallback, its login token.
Step1X's `vae.safetensors` is skipped when FLUX's `ae.safetensors` (the same weights) is there, and
the Qwen2.5-VL folder when ComfyUI's single-file Qwen2.5-VL-7B is. huggingface_hub is an optional dependency: `pip install "step1x-edit[download]"`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

from ..release_files import DIT_RELEASE, RELEASE_FILES, ModelFile
from ..versions import VERSIONS, Version

logger = logging.getLogger(__name__)

ROLES = ("dit", "text_encoder", "vae")
VAE_NAME = "vae.safetensors"  # Step1X-Edit's copy of the FLUX VAE
FLUX_VAE_NAME = "ae.safetensors"  # the same weights, as FLUX users already have them
QWEN_NAME = "Qwen2.5-VL-7B-Instruct"
# What the Qwen2.5-VL loader reads: config, generation/preprocessor configs, chat template,
# tokenizer (tokenizer.json, vocab.json + merges.txt) and the sharded weights with their index.
QWEN_PATTERNS = ("*.json", "*.jinja", "merges.txt", "*.safetensors")
MIN_HUB_VERSION = (0, 23)  # local_dir downloads are real files that resume in place from 0.23
INSTALL_HINT = 'pip install "step1x-edit[download]"'


class DownloadError(RuntimeError):
    """The model files could not be fetched; the message says what goes where and how to get it by hand."""


@dataclass(frozen=True)
class PlannedDownload:
    """One download: a single file (`filename`) or a folder of files matching `allow_patterns`."""

    role: str
    repo: str
    destination: Path  # the file itself, or the folder the repo's files go into
    filename: str | None = None
    allow_patterns: tuple[str, ...] = ()
    # A folder of the repository (v1.2's transformer/, text_encoder/): downloaded into its parent, so the
    # release keeps its published layout and the Hub's resume metadata.
    repo_folder: str | None = None

    @property
    def local_dir(self) -> Path:
        return self.destination.parent if self.repo_folder else self.destination

    @property
    def is_folder(self) -> bool:
        return self.filename is None

    @property
    def source(self) -> str:
        """The file name, or the patterns of the folder's files, as in the repo."""
        return self.filename if self.filename is not None else " ".join(self.allow_patterns)

    def local_path(self, repo_path: str) -> Path:
        return self.destination / repo_path if self.is_folder else self.destination

    def describe(self) -> str:
        if self.is_folder:
            return (f"the {self.destination.name} folder ({', '.join(self.allow_patterns)} of {self.repo}) "
                    f"-> {self.destination}/")
        return f"{self.filename} ({self.repo}) -> {self.destination.parent}/"

    def manual_command(self) -> str:
        if self.is_folder:
            include = " ".join(shlex.quote(p) for p in self.allow_patterns)
            return f"hf download {self.repo} --include {include} --local-dir {shlex.quote(str(self.local_dir))}"
        return f"hf download {self.repo} {self.filename} --local-dir {shlex.quote(str(self.destination.parent))}"


# ---------------------------------------------------------------------------------------------
# planning (no network)


def _release_file(name: str) -> ModelFile:
    return next(f for f in RELEASE_FILES if f.name == name)


def _normalise_include(include: Iterable[str]) -> tuple[str, ...]:
    roles = tuple(dict.fromkeys(include))  # keep the order, drop repeats
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"unknown or no model role(s) {unknown or list(roles)}: choose from {', '.join(ROLES)}")
    return roles


def flux_vae_path(models_dir: Path) -> Path:
    flux = _release_file(FLUX_VAE_NAME)
    return models_dir / flux.folder / flux.name


def comfy_qwen_file(models_dir: Path) -> Path | None:
    """ComfyUI's single-file Qwen2.5-VL-7B (Qwen-Image's text encoder) if it is in models/text_encoders/."""
    for entry in RELEASE_FILES:
        path = models_dir / entry.folder / entry.name
        if entry.role == "text_encoder" and entry.name != QWEN_NAME and path.is_file():
            return path
    return None


def plan_downloads(models_dir: str | Path, version: Version | str = Version.V1_1,
                   include: Iterable[str] = ROLES) -> list[PlannedDownload]:
    """What `download_models` would fetch, and where; downloads nothing.

    Looks at the disk only to drop the VAE when FLUX's `ae.safetensors` is already in `models/vae/`, and the
    Qwen2.5-VL folder when ComfyUI's single-file Qwen2.5-VL-7B is already in `models/text_encoders/`.
    """
    version = Version.parse(version)
    models_dir = Path(models_dir)
    plan: list[PlannedDownload] = []
    for role in _normalise_include(include):
        released = [f for f in RELEASE_FILES if f.role == role and f.repo_folder and version in f.versions]
        if version is Version.V1_2 and released:  # v1.2's own transformer/ and text_encoder/ folders
            entry = released[0]
            plan.append(PlannedDownload(role, entry.repo, models_dir / entry.folder / entry.name,
                                        allow_patterns=(f"{entry.repo_folder}/*",), repo_folder=entry.repo_folder))
        elif role == "dit":
            dit = _release_file(DIT_RELEASE[version])
            plan.append(PlannedDownload("dit", dit.repo, models_dir / dit.folder / dit.name, filename=dit.name))
        elif role == "text_encoder" and comfy_qwen_file(models_dir) is not None:
            logger.info("%s is present (ComfyUI's Qwen2.5-VL-7B, which Step1X-Edit loads too): not downloading "
                        "the %s folder", comfy_qwen_file(models_dir), QWEN_NAME)
        elif role == "text_encoder":
            qwen = _release_file(QWEN_NAME)
            plan.append(PlannedDownload("text_encoder", qwen.repo, models_dir / qwen.folder / qwen.name,
                                        allow_patterns=QWEN_PATTERNS))
        elif flux_vae_path(models_dir).is_file():
            logger.info("%s is present (FLUX's VAE, the same weights as Step1X's %s): not downloading the VAE",
                        flux_vae_path(models_dir), VAE_NAME)
        else:
            vae = _release_file(VAE_NAME)
            plan.append(PlannedDownload("vae", vae.repo, models_dir / vae.folder / vae.name, filename=vae.name))
    return plan


# ---------------------------------------------------------------------------------------------
# huggingface_hub (optional)


def _import_hub() -> ModuleType:
    try:
        import huggingface_hub
    except ImportError as err:
        raise DownloadError(
            f"downloading needs the huggingface_hub package, which is not installed ({err}). "
            f"Install it with: {INSTALL_HINT}") from err
    version = _version_tuple(getattr(huggingface_hub, "__version__", "0"))
    if version < MIN_HUB_VERSION:
        raise DownloadError(
            f"downloading needs huggingface_hub >= {'.'.join(map(str, MIN_HUB_VERSION))} (found "
            f"{huggingface_hub.__version__}). Upgrade it with: {INSTALL_HINT} --upgrade")
    return huggingface_hub


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _fetch_errors(hub: ModuleType) -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub could not be reached or refused": offline, no network, HTTP errors."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "IncompleteSnapshotError"):
        cls = getattr(hub.utils, name, None)
        if isinstance(cls, type):
            errors.append(cls)
    # A connection dropped mid-download surfaces as the HTTP client's own error.
    for module_name, name in (("requests", "RequestException"), ("httpx", "TransportError"),
                              ("httpx2", "TransportError")):
        cls = getattr(sys.modules.get(module_name), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def _fetch(hub: ModuleType, item: PlannedDownload, token: str | None) -> None:
    """Make ``item`` present with huggingface_hub's local-dir download, which skips files it already
    fetched (its metadata under ``.cache/huggingface/``) or whose sha256 matches the Hub's (a file copied
    in by hand: about 20 s for the 25 GB DiT, once), resumes partial files, and, when the Hub cannot
    be reached, keeps files already there (it logs a warning) instead of failing."""
    item.destination.parent.mkdir(parents=True, exist_ok=True)
    if item.is_folder:
        logger.info("fetching %s (%s) into %s", item.repo, " ".join(item.allow_patterns), item.destination)
        hub.snapshot_download(item.repo, allow_patterns=list(item.allow_patterns), local_dir=item.local_dir,
                              token=token)
    else:
        logger.info("fetching %s from %s into %s", item.filename, item.repo, item.destination.parent)
        hub.hf_hub_download(item.repo, item.filename, local_dir=item.destination.parent, token=token)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}".rstrip(": .")


def _unreachable_error(remaining: Sequence[PlannedDownload], err: BaseException) -> DownloadError:
    wanted = "; ".join(item.describe() for item in remaining)
    commands = " ; ".join(item.manual_command() for item in remaining)
    return DownloadError(
        f"the model files could not be fetched from the Hugging Face Hub (offline, no network, or refused "
        f"by the Hub: {_first_line(err)}). Files still needed, and where they go: {wanted}. "
        f"Download them by hand when online: {commands} "
        f"(on huggingface_hub < 0.34 use `huggingface-cli download` with the same arguments; for a gated or "
        f"private repo log in first or pass a token), or run this again")


# ---------------------------------------------------------------------------------------------
# public API


def download_models(models_dir: str | Path, version: Version | str = Version.V1_1, include: Iterable[str] = ROLES,
                    token: str | None = None) -> list[Path]:
    """Download the Step1X-Edit model files into a ComfyUI `models/` folder.

    Returns the model path of each requested role (the DiT file, the Qwen2.5-VL folder, the VAE file;
    FLUX's `ae.safetensors` when it stands in for the VAE, ComfyUI's Qwen2.5-VL-7B file for the folder). Raises DownloadError when huggingface_hub
    is missing or the Hub cannot be reached, ValueError for a bad version/role or models folder.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ValueError(f"models folder {models_dir} does not exist: pass ComfyUI's models/ folder")
    roles = _normalise_include(include)
    plan = plan_downloads(models_dir, version, roles)
    hub = _import_hub()
    for position, item in enumerate(plan):
        try:
            _fetch(hub, item, token)
        except _fetch_errors(hub) as err:
            raise _unreachable_error(plan[position:], err) from err
    paths = {item.role: item.destination for item in plan}
    if "vae" in roles and "vae" not in paths:
        paths["vae"] = flux_vae_path(models_dir)
    if "text_encoder" in roles and "text_encoder" not in paths:
        paths["text_encoder"] = comfy_qwen_file(models_dir)
    return [paths[role] for role in roles]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step1x-edit-download",
                                description="Download the Step1X-Edit model files into a ComfyUI models/ folder.")
    p.add_argument("--models-dir", required=True, type=Path,
                   help="ComfyUI's models/ folder (files go to diffusion_models/, text_encoders/, vae/)")
    p.add_argument("--version", choices=VERSIONS, default="v1.1",
                   help="which DiT (default: v1.1); v1.2 also fetches its own fine-tuned text encoder")
    p.add_argument("--only", action="append", choices=ROLES, metavar="{dit,text_encoder,vae}",
                   help="download only this part; repeat for several (default: all three)")
    p.add_argument("--token", help="Hugging Face token (default: the saved login, if any)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths = download_models(args.models_dir, args.version, tuple(args.only or ROLES), token=args.token)
    except KeyboardInterrupt:
        print("step1x-edit-download: interrupted; run it again to resume", file=sys.stderr)
        return 130
    except (DownloadError, ValueError, OSError) as err:
        message = " ".join(str(err).split())  # one line
        print(f"step1x-edit-download: error: {message}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
