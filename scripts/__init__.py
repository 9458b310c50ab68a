"""Scripts around nemo_aot (not part of the installed package). A program of several modules is
a subpackage run from the repository root, e.g. ``python -m scripts.experiments.run_study``; a
one-file script imports only installed packages and runs by its path."""
