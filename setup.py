"""Only the compiled part of midiforge; everything else is in pyproject.toml.

Both extensions are optional: where they cannot be built (no C compiler), the install goes on and
midiforge uses its Python/NumPy code for the same steps, which gives the same results
(tests/test_native.py): _events is the events tokenizer's encode_batch, _midi the bulk step
of the batch MIDI reader."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension(f"midiforge.music.{name}", [f"src/midiforge/music/{name}.c"], optional=True,
              extra_compile_args=["-O2", "-std=c99", "-ffp-contract=off"])
    for name in ("_events", "_midi")
])
