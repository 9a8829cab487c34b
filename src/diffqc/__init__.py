"""diffqc: good-only visual quality control with a class-conditional diffusion model."""

# A bundle records the version that wrote it, and a diffqc refuses one whose settings it does not
# know as a newer version's (upgrade here, or train with this version): so a version that adds a
# setting, or a value of one an older diffqc does not read, raises the minor (the settings of this
# one: tests/test_config.py, SETTINGS_OF_VERSION).
__version__ = "0.3.0"

__all__ = ["__version__"]

# The Python API lives in the pipeline's stage modules (README, "Python API"); the package
# re-exports nothing (the model module imports the package: a re-export would be a cycle). A user
# who asks the package for one of them (`from diffqc import Detector`) is told where it is.
_API_MODULES = {"Detector": "diffqc.model", "DetectorConfig": "diffqc.config",
                "load_dataset": "diffqc.data", "read_image": "diffqc.data",
                "holdout_report": "diffqc.holdout", "overlay": "diffqc.visualize"}


def __getattr__(name: str) -> object:
    # an ImportError: `from diffqc import X` shows its text (an AttributeError's it drops)
    if name in _API_MODULES:
        raise ImportError(f"{name} is in {_API_MODULES[name]}: from {_API_MODULES[name]} import {name} "
                          "(README, \"Python API\")", name=name)
    raise AttributeError(f"module 'diffqc' has no attribute {name!r}")
