"""Provider and model facts as data: every YAML file in this folder, loaded one way.

The request side, the response side, diagnosis and the views read their tables from here, so a
new model, provider or price is a data edit, never a Python branch.
"""

from pathlib import Path

CATALOG_DIR = Path(__file__).resolve().parent


def catalog_file(name: str) -> Path:
    """Path of a shipped catalog table, e.g. `catalog_file("prices.yaml")`."""
    return CATALOG_DIR / name
