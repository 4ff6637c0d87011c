"""The pipeline's stages, a module each: a stage function reads the candidate params and writes exactly the outputs
dvc.yaml declares for it, and dvc.yaml lists as its code what its module imports (tests/test_stage_deps.py derives
that list). components/stage_runner.py names the stages and runs one (`graft stage NAME`). This file stays empty
of code: every stage imports it."""
