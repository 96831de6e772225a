# knowsep recipes: thin wrappers over the `knowsep` command.
# Arguments are field=value overrides of the stage config (see `knowsep describe STAGE`),
# e.g. `just train variant=adaptive` or `just harvest model.layer=6`.

set positional-arguments := false

config := "configs/demo.toml"

# List the recipes.
default:
    @just --list

# Harvest one layer's activations of the forget and retain corpora into a Zarr store.
harvest *args:
    knowsep harvest --config {{config}} {{args}}

# Train an SAE variant on the store: `just train variant=standard` (the default).
train *args:
    knowsep train --config {{config}} {{args}}

# Resume the latest run of a variant from its last complete checkpoint.
resume *args:
    knowsep train --config {{config}} --resume {{args}}

# Core metrics (SAEBench layout) of a trained run: `just eval-core variant=standard`.
eval-core *args:
    knowsep eval core --config {{config}} {{args}}

# Cross-validate the variants over folds of WMDP-bio questions: `just crossval folds=5`.
crossval *args:
    knowsep crossval --config {{config}} {{args}}

# Harvest, train and evaluate the standard SAE on the embedded model, then print a summary.
demo *args:
    knowsep demo --config {{config}} {{args}}

# Run the test suite (the same command CI runs).
test *args:
    python -m pytest -q {{args}}

# Lint and type-check.
lint:
    ruff check knowsep pipeline trainer stores evals tests bench
    mypy

# Benchmarks: `just bench harvest`, `just bench masks` (figures go in docs/benchmarks.md).
bench what *args:
    knowsep bench {{what}} {{args}}

# Unlearning sweep of a trained run: `just unlearn variant=adaptive preset=cpu`.
unlearn *args:
    knowsep eval unlearning --config {{config}} {{args}}

# SAEBench sparse probing of a trained run: `just probe variant=standard`.
probe *args:
    knowsep eval sparse-probing --config {{config}} {{args}}

# Export a run's SAE to SAELens's format: `just export runs/demo/adaptive/sae runs/demo/adaptive/saelens`.
export sae_dir out_dir *args:
    knowsep export {{sae_dir}} {{out_dir}} {{args}}

# Verify the separation bounds of a trained run: `just bounds variant=adaptive`.
bounds *args:
    knowsep eval bounds --config {{config}} {{args}}

# One HTML page (and a markdown twin) comparing the variants of an experiment.
report *args:
    knowsep report --config {{config}} {{args}}

# The whole study on the embedded model: harvest, three variants trained without the
# WMDP-bio questions, every eval, cross-validation and the report.
# `just experiment PATH` runs it with another config.
experiment cfg="configs/experiment.toml":
    knowsep harvest -c {{cfg}}
    for v in standard fixed adaptive; do \
        knowsep train -c {{cfg}} --resume variant=$v && \
        knowsep eval core -c {{cfg}} variant=$v && \
        knowsep eval unlearning -c {{cfg}} variant=$v preset=cpu && \
        knowsep eval sparse-probing -c {{cfg}} variant=$v && \
        knowsep eval bounds -c {{cfg}} variant=$v || exit 1; \
    done
    knowsep crossval -c {{cfg}}
    knowsep report -c {{cfg}}
