"""Builds sdepth_ext._C, the C++ gate scheduler and zero-gradient writer, with torch.utils.cpp_extension
(ninja, pybind11).

Environment switches:
  SDEPTH_SKIP_BUILD=1   pure-Python install: no compiled scheduler (the package falls back and warns)
  DEBUG=1               -O0 -g instead of -O3
  MAX_JOBS=N            parallel compile jobs (read by torch.utils.cpp_extension)
Both are plain C++ (no .cu file), so a CppExtension is enough on every machine; the
Triton kernels are compiled just in time at first use and are not part of this build.
"""

import glob
import os

from setuptools import setup

SKIP_BUILD = os.environ.get("SDEPTH_SKIP_BUILD", "0") == "1"
DEBUG = os.environ.get("DEBUG", "0") == "1"


def extensions():
    if SKIP_BUILD:
        print("sdepth_ext build: SDEPTH_SKIP_BUILD=1 -> pure-Python install, no sdepth_ext._C")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch headers need
    # (C++17 for torch 2.4, C++20 for the newest releases).
    print(
        "sdepth_ext build: extension=CppExtension sdepth_ext._C, "
        f"sources={sources}, cxx_flags={cxx_flags}, debug={DEBUG}, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}"
    )
    ext = CppExtension("sdepth_ext._C", sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
