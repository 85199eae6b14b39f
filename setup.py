"""Only the compiled part of midiforge; everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), the install goes on and
EventsTokenizer uses its NumPy code, which gives the same ids (tests/test_native.py)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("midiforge.music._events", ["src/midiforge/music/_events.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c99"])])
