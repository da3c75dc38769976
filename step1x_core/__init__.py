"""Step1X-Edit in plain PyTorch: DiT, connector, Qwen-VL embedder, FLUX VAE, sampling, pipeline.

Nothing here imports ComfyUI; the node pack in ``nodes/`` adapts these pieces to ComfyUI.
"""

__version__ = "0.1.0"
