"""`step1x-edit-quantize`: a Step1X-Edit DiT as a small file for 8-16 GB cards.

    step1x-edit-quantize step1x-edit-v1p1-official.safetensors --format fp8 \
        --output step1x-edit-v1p1-fp8mixed.safetensors
    step1x-edit-quantize Step1X-Edit-v1p2/transformer --format q4_1 --output step1x-edit-v1p2-Q4_1.gguf

fp8 writes ComfyUI's mixed-precision fp8 .safetensors (Load Step1X-Edit DiT or Load Diffusion Model, ComfyUI
0.3.75+); q8_0, q5_0, q5_1, q4_0 and q4_1 write GGUF (ComfyUI-GGUF's Unet Loader (GGUF)). The engine loads both.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..quantize.core import FORMATS, QuantizeError, quantize_dit
from ..formats.safetensors_file import ModelFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step1x-edit-quantize", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("input", help="the DiT: a .safetensors file (v1.0, v1.1, v1.2; original or diffusers "
                                      "layout) or a diffusers transformer/ folder of shards")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="fp8: ComfyUI's mixed-precision fp8; q8_0 ... q4_1: GGUF block formats")
    parser.add_argument("--output", required=True, help="the file to write (.safetensors for fp8, .gguf otherwise)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = quantize_dit(args.input, args.format, args.output, progress=not args.quiet,
                              overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("step1x-edit-quantize: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (QuantizeError, ModelFileError, OSError) as err:
        print(f"step1x-edit-quantize: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    kept = ", ".join(sorted(report.kept_bf16)) or "none"
    print(f"wrote {report.output} ({report.bytes_written / 1e9:.2f} GB, Step1X-Edit {report.version}, "
          f"{report.format}; kept in bf16: {kept})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
