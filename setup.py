"""Build the Cython kernels in nebula/_fast/ and the Raft core (Rust, pyo3) in rust/.

The Raft core ``nebula.raft._core`` wraps tikv's raft-rs; it is always built (cargo
must be on PATH; the crates come from the Rust crate registry on the first build).

Every kernel has a pure-Python twin; nebula._fast picks the compiled one when it
imports and the pure one when NEBULA_PURE=1 is set.  Set NEBULA_NO_EXT=1 to
install without compiling (the pure twins are used then).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("NEBULA_NO_EXT") != "1":
    from Cython.Build import cythonize

    # A kernel whose .pyx is absent is skipped (its pure twin serves).
    kernels = [
        k for k in ("_keccak", "_frame", "_pb", "_cmd") if os.path.exists(f"nebula/_fast/{k}.pyx")
    ]
    ext_modules = cythonize(
        [
            Extension(
                f"nebula._fast.{name}",
                [f"nebula/_fast/{name}.pyx"],
                extra_compile_args=["-O3"],
                libraries=["crypto"] if name == "_frame" else [],
            )
            for name in kernels
        ],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )

from setuptools_rust import Binding, RustExtension  # noqa: E402

rust_extensions = [
    RustExtension(
        "nebula.raft._core",
        path="rust/Cargo.toml",
        binding=Binding.PyO3,
        py_limited_api="auto",
        debug=False,
    )
]

setup(ext_modules=ext_modules, rust_extensions=rust_extensions)
