"""Import-only stand-in; see ``torchvision/__init__.py``."""


def __getattr__(name):
    raise AttributeError(f"torchvision stand-in: {__name__}.{name} is not available")
