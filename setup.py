"""Builds the optional CPU kernels (falconet/quant/_kernels.c); metadata is in pyproject.toml.

The extension is plain C against the CPython API (no torch headers), so building it
needs only a C compiler, never PyTorch in the build environment. Without a compiler,
or if the build fails, falconet installs anyway and the quantized layers fall back to
dequantize + matmul in PyTorch (correct, slower); `falconet info` says which is in use.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self._skip(e)

    def _skip(self, e):
        print(
            f"falconet: compiled kernels not built ({e}); using the PyTorch fallback",
            file=sys.stderr,
        )


# -ffp-contract=off: dequantization computes q*d + m with two roundings, as GGML does,
# so the kernels match the reference codecs bit for bit.
flags = ["-O3", "-std=c11", "-ffp-contract=off"]
link = []
if sys.platform.startswith("linux"):
    flags.append("-fopenmp")
    link.append("-fopenmp")

setup(
    ext_modules=[
        Extension(
            "falconet.quant._kernels",
            ["falconet/quant/_kernels.c"],
            depends=[
                "falconet/quant/kernels_rows.h",
                "falconet/quant/kernels_x8.h",
                "falconet/quant/kernels_x8_tiles.h",
                "falconet/quant/kernels_kquants.h",
                "falconet/quant/kernels_kq_x8.h",
                "falconet/quant/kernels_kq_x8_tiles.h",
                "falconet/quant/kernels_kblocks.h",
                "falconet/quant/kernels_quantize.h",
                "falconet/quant/kernels_kquantize.h",
                "falconet/quant/kernels_float.h",
                "falconet/quant/kernels_lora.h",
                "falconet/quant/kernels_scan.h",
                "falconet/quant/kernels_attention.h",
                "falconet/quant/kernels_activation.h",
                "falconet/quant/kernels_norm.h",
                "falconet/quant/kernels_ternary.h",
                "falconet/quant/kernels_tq2.h",
                "falconet/quant/kernels_tq2_dot.h",
                "falconet/quant/kernels_portable.h",
                "falconet/quant/kernels_drivers.h",
                "falconet/quant/kernels_bindings.h",
            ],
            extra_compile_args=flags,
            extra_link_args=link,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
