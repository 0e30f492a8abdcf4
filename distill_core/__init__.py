"""What the three packages share: command configuration, the command dispatcher, checkpoint I/O,
the cores a process may use.

It sits below `shards`, `teacher_service` and `student_trainer` and imports none of them.
"""

from .checkpoint import atomic_save, clean_state_dict, load_training_checkpoint, read_weights, save_weights
from .cli import App, Command, parse_script_args
from .config import ConfigError, Nested, NotAFlag, Positional, add_arguments, from_arguments, read_secret, to_argv
from .system import autocast, free_port, usable_cpus

__all__ = [
    "App",
    "Command",
    "ConfigError",
    "Nested",
    "NotAFlag",
    "Positional",
    "add_arguments",
    "atomic_save",
    "autocast",
    "clean_state_dict",
    "load_training_checkpoint",
    "free_port",
    "from_arguments",
    "lazy_exports",
    "parse_script_args",
    "read_secret",
    "read_weights",
    "save_weights",
    "to_argv",
    "usable_cpus",
]


def lazy_exports(package: str, exports: dict[str, str]):
    """(__all__, __getattr__) for a package whose public names are imported on first use:
    `exports` maps each name to the submodule (relative to `package`) that defines it."""
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return sorted(exports), __getattr__
