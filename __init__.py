"""ComfyUI entry point of the Step1X-Edit node pack. Nothing else lives here.

ComfyUI imports this folder as a package and calls `comfy_entrypoint`; the node classes are only
imported then, so importing the pack (or `step1x_core`) never needs ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import Step1XEditExtension

    return Step1XEditExtension()
