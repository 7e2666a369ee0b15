"""Pipeline stages. Each module has one entry function `run(recipe, run_dir) -> dict` and, beside it, `SECTIONS`
(the recipe sections it reads); it imports only the floors below (models, scoring, products, hubclient, ...),
never another stage (see hubforge.pipeline, tests/test_layers.py)."""
