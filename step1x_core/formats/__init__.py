"""Reading model files and telling what they are: shared by the DiT, VAE and Qwen2.5-VL loaders."""
