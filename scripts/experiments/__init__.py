"""The AOT-vs-DPO study (README.md here): ``python -m scripts.experiments.run_study`` from the
repository root runs every stage; each stage module also runs on its own the same way."""
