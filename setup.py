"""fedmount: a read-only FUSE client for a federation of Arvados clusters."""

from setuptools import Extension, find_packages, setup

# Multi-buffer md5 (fedmount/blocks/md5.py). Optional: where it cannot be built, pip still
# installs fedmount and md5.py falls back to hashlib. The SIMD kernels carry their own
# per-function target attributes, so no -m flags here: one binary runs on every x86-64.
# -O3 whatever Python was built with: at -O2 the 16x16 transpose costs ~7% more.
MD5MB = Extension(
    "fedmount.blocks._md5mb", ["fedmount/blocks/_md5mb.c"], extra_compile_args=["-O3"], optional=True
)

setup(
    name="fedmount",
    version="0.1.0",
    description="Read-only FUSE mounts of Arvados collections from any cluster of a federation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fedmount", "fedmount.*"]),
    ext_modules=[MD5MB],
    install_requires=[
        "pyfuse3>=3.3",
        "trio>=0.25",
        "httpx>=0.27",
        "diskcache>=5.6",
        "psutil>=5.9",
        # The Keep data path: urllib3 reads 64 MiB bodies ~4x faster than httpx
        # on this class of machine (see fedmount/blocks/keep.py).
        "urllib3>=2.0",
        # Per-chunk checksums of cached blocks: xxh3 runs at ~15 GB/s, so every
        # cached read is verified at no measurable cost (fedmount/blocks/cache/format.py).
        "xxhash>=3.0",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-trio>=0.8",
            "hypothesis>=6.100",
            "trustme>=1.1",
            "arvados-python-client>=3.0",
            "cwltool>=3.1",
            "ruff>=0.5",
        ],
    },
    entry_points={
        "console_scripts": [
            "fedmount=fedmount.cli:main",
            "fedmount-run=fedmount.runner.cli:main",
            # fedmount under arv-mount's command line; never named arv-mount, so that it cannot
            # shadow a real one: `make arv-mount-link` links it as arv-mount (README).
            "fedmount-arv-mount=fedmount.arvmount_cli:main",
        ],
    },
    data_files=[("share/man/man1", ["man/fedmount.1", "man/fedmount-run.1"])],
)
