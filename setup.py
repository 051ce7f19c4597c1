"""setuptools hook (the project's metadata is in pyproject.toml): an installed package ships the
benchmark suite, so ``recon3d bench`` runs without a source checkout.

A regular (non-editable) build copies ``benchmarks/*.py`` to ``recon3d/benchmarks/`` and
``configs/**/*.yaml`` (which some benchmarks read, at ``Path(__file__).parents[1] / "configs"``)
to ``recon3d/configs/`` in the wheel. The files stay where they are in the checkout (``make
bench``, ``python -m benchmarks.run_all`` and the tests use them there), and an editable install
runs the checkout's own folder (:mod:`recon3d.commands.bench`), so nothing is copied for it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: (folder in the checkout, glob, folder inside the installed ``recon3d`` package)
SHIPPED = (("benchmarks", "*.py", "benchmarks"), ("configs", "**/*.yaml", "configs"))


class BuildPyWithBenchmarks(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, pattern, dst in SHIPPED:
            for f in sorted((ROOT / src).glob(pattern)):
                out = Path(self.build_lib) / "recon3d" / dst / f.relative_to(ROOT / src)
                self.mkpath(str(out.parent))
                self.copy_file(str(f), str(out))


setup(cmdclass={"build_py": BuildPyWithBenchmarks})
