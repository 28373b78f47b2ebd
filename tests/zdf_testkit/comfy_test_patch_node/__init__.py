"""TEST-ONLY ComfyUI custom node: installs the tiny-model detection patch when ComfyUI imports it.

Never install this in a real ComfyUI. Server tests copy it with
``zdf_testkit.tiny_zimage.install_test_patch_node(<base>/custom_nodes)``, which places
``tiny_zimage.py`` beside this file; ComfyUI then imports the folder at start-up, the patch makes
tiny Z-Image DiTs and tiny Qwen3 text encoders loadable by the stock loader nodes, and no node is
registered (an empty ``NODE_CLASS_MAPPINGS`` counts as a successful import).
"""

from .tiny_zimage import install_tiny_detection_patch  # copied beside this file with tiny_qwen3.py

install_tiny_detection_patch()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
