"""Import-only stand-in for torchvision (see zdf_standin.py); on sys.path only when the real one does not import."""

import sys

from zdf_standin import stand_in

stand_in(sys.modules[__name__])
