"""What the three packages share: command configuration, the command dispatcher, checkpoint I/O,
the cores a process may use.

It sits below `shards`, `teacher_service` and `student_trainer` and imports none of them. Its names
are imported on first use, so that a module needing one of them (the label engine's contract, which
must not load torch) does not load the others.
"""

from __future__ import annotations


def lazy_exports(package: str, exports: dict[str, str]):
    """(__all__, __getattr__) for a package whose public names are imported on first use:
    `exports` maps each name to the submodule (relative to `package`) that defines it."""
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return sorted(exports), __getattr__


_EXPORTS = {
    **dict.fromkeys(
        [
            "atomic_save",
            "clean_state_dict",
            "load_matching",
            "load_training_checkpoint",
            "read_weights",
            "save_weights",
        ],
        ".checkpoint",
    ),
    **dict.fromkeys(["App", "Command", "parse_script_args"], ".cli"),
    **dict.fromkeys(
        ["ConfigError", "Nested", "NotAFlag", "Positional", "add_arguments", "from_arguments"]
        + ["read_secret", "to_argv"],
        ".config",
    ),
    **dict.fromkeys(["autocast", "free_port", "usable_cpus"], ".system"),
}
__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = [*__all__, "lazy_exports"]
