"""vireid: visible-infrared person re-identification.

Library layout (dependencies point downward):
``cli`` -> ``engine`` / ``serve`` -> ``models`` / ``retrieval`` / ``evaluation`` -> ``data``.
"""

__version__ = "0.1.0"
