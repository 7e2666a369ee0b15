"""Pipeline stages. Each module has one entry function `run(recipe, run_dir) -> dict` (see hubforge.pipeline)."""
