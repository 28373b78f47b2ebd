"""Z-Image DimFix: measure and fix per-dimension mismatches of Z-Image text conditioning.

ComfyUI imports this file. Everything that needs ComfyUI is imported inside
``comfy_entrypoint`` so that the pure core (``dimfix``) and the test suite can import the
pack without a ComfyUI install.
"""

__version__ = "0.1.0"
#: Served to the frontend at /extensions/<pack folder>/: the node help pages (docs/<NodeId>.md, the fallback
#: for every language, and docs/<NodeId>/en.md, zh.md) and the Analyzer's report preview (js/).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DimFixExtension
    from .nodes.comfy_access import register_fix_tables_folder

    register_fix_tables_folder()  # models/fix_tables (+ the pack's fix_tables/) in ComfyUI's model folders
    return DimFixExtension()
