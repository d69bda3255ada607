"""The compiled part of the boundary evaluation; everything else is in pyproject.toml."""

from setuptools import Extension
from setuptools import setup

setup(ext_modules=[
    Extension('cmtdp_jax.evaluation._boundary_match',
              ['cmtdp_jax/evaluation/_boundary_match.pyx'], extra_compile_args=['-O3']),
])
