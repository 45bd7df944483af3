"""Only for the compiled hot path; everything else about the package is in setup.cfg.

``optional=True``: where no C compiler is found the install still succeeds, and the
relay runs the same code in Python (relay/frotcom.py says which path a body takes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("relay._rows", ["relay/_rows.c"], optional=True),
        Extension("relay._sqlrun", ["relay/_sqlrun.c"], optional=True),
    ]
)
