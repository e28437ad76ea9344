"""The converter stays light: transformers and matplotlib load only when a model needs them."""

from __future__ import annotations

import subprocess
import sys


def test_convert_and_cli_import_no_heavy_optional_packages():
    code = (
        "import sys, monarch_matrices.convert, monarch_matrices.cli, monarch_matrices; "
        "monarch_matrices.monarchify; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'transformers', 'matplotlib', 'timm'} or m.startswith('monarch_matrices.recipes'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
