"""Import-only stand-in for torchvision, used by the host tier when no working torchvision exists.

PyPI has no CPU build of torchvision for every torch release, and ComfyUI imports it at module level
for models this pack never touches (Stable Cascade, Cosmos, ACE). The stand-in lets those modules
import; using any attribute raises, so nothing can silently depend on it.
"""

_MESSAGE = "torchvision is not installed; this test environment uses an import-only stand-in"


def __getattr__(name):
    raise AttributeError(f"{_MESSAGE} (torchvision.{name} requested)")
