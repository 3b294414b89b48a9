"""``pip install .``: the repository root is the package ``glm_image_nodes`` (ComfyUI loads the same folder as a
custom node pack under its folder's name); every package under core/, nodes/, headless/, serving/ and testing/ goes
with it.
Metadata and dependencies are in pyproject.toml."""
from setuptools import find_packages, setup

SUBPACKAGES = ("core", "nodes", "headless", "serving", "testing")

if __name__ == "__main__":  # how setuptools runs it; the installed copy of this file does nothing on import
    setup(package_dir={"glm_image_nodes": "."},
          packages=["glm_image_nodes"] + [f"glm_image_nodes.{p}"
                                          for p in find_packages(include=[f"{s}*" for s in SUBPACKAGES])])
