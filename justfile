# Shortcuts for the recipe runner. `just --list` shows them all.
set shell := ["bash", "-euo", "pipefail", "-c"]

python := ".venv/bin/python"

# Create .venv, apply an install set (cpu | gpu | colab-a100) and add-ons (gguf, deepspeed), build the tiny model and data
setup set="cpu" *addons:
    test -x {{python}} || python3 -m venv {{ if set == "cpu" { "" } else { "--system-site-packages" } }} .venv
    {{python}} -m pip install -q --disable-pip-version-check click pyyaml jsonschema packaging
    {{python}} -m runner install {{set}} {{addons}}
    {{python}} -m runner tiny

# Run a recipe end to end, e.g. `just run recipes/smoke_tiny.yaml --set train.max_steps=5`
run recipe *args:
    {{python}} -m runner run {{recipe}} {{args}}

# Evaluate a run directory, LoRA export or merged model on a recipe's eval rows: `just eval runs/x/2026... recipes/x.yaml`
eval target recipe *args:
    {{python}} -m runner eval {{target}} --recipe {{recipe}} {{args}}

# DPO pairs from a run's mistakes on training rows: `just pairs runs/memorize-tiny --out runs/pairs.parquet`
pairs target *args:
    {{python}} -m runner pairs {{target}} {{args}}

# Export the latest run of a recipe (or a given run directory) without retraining: `just export recipes/x.yaml gguf`
export run format *args:
    {{python}} -m runner export {{run}} --format {{format}} {{args}}

# LaTeX for images from any export: `just predict exports/x/gguf a.png b.png`
predict model *images:
    {{python}} -m runner predict --model {{model}} {{images}}

# Validate recipes without running them (default: every recipe under recipes/)
validate *files:
    {{python}} -m runner validate {{ if files == "" { "$(find recipes -name '*.yaml' | sort)" } else { files } }}

# Run the test suite (slow tests included, as in CI)
test *args:
    {{python}} -m pytest -ra --durations=8 {{args}}

# Colab A100 bootstrap: a venv over Colab's own torch, Unsloth's install lines, then the tiny assets
colab-setup:
    just setup colab-a100

# Copy the flagship recipe for a new dataset: `just new my_formulas path/or/hub-id`
new name dataset="":
    {{python}} -m runner new {{name}} {{ if dataset == "" { "" } else { "--dataset " + dataset } }}

# Regenerate the README's recipe reference from schemas/
reference:
    {{python}} -m runner reference

# List runs with how they ended (running, done, failed, interrupted, killed), their step and key metrics
runs output_dir="runs":
    {{python}} -m runner runs --output-dir {{output_dir}}
