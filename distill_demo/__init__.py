"""The end-to-end demo: every part of the project, each step a process of its own, on the embedded
default (no Redis, no Docker). It sits above the three packages it runs (`python -m distill_demo`)."""
