"""setuptools hook, named in pyproject's ``[tool.setuptools.cmdclass]``: every wheel
(``pip install .``, ``pip wheel .``, ``python -m build``, ``packaging/build-pyz``)
carries the repository's top-level ``schema.sql`` as ``mailbox_guard/schema.sql``.

Why a hook: the design keeps one schema at the repository top, outside the package,
and package data can only name files inside a package folder. An installed engine
reads it beside its modules (``store.schema_text()`` looks there first; a source
checkout falls back to the top-level file). Editable installs copy nothing: they
run from the checkout, where the fallback finds it.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def build_package_data(self) -> None:
        super().build_package_data()
        self.copy_file("schema.sql", os.path.join(self.build_lib, "mailbox_guard", "schema.sql"))
