"""`sdlora import-kohya`: a kohya-ss/sd-scripts config (its `--config_file` TOML, its `--dataset_config` TOML/JSON)
or the bmaltais kohya_ss GUI's JSON, as an sdlora config that trains the same thing, with a table of every option.

- `read.py`     the files: kohya's TOML sections flattened, the GUI's keys and value spellings as kohya options.
- `rules.py`    what a table row is, the kinds of rule (a key, a converter, no effect, not supported), value readers.
- `options.py`  THE table: kohya option -> sdlora key, converter, or the reason it is not supported.
- `network.py`  `network_module` / `network_args`: LoRA kind, conv rank, LoRA+, block learning-rate weights.
- `dataset.py`  folders, `[general]` / `[[datasets]]` / `[[datasets.subsets]]` -> `data.subsets`, image counts.
- `convert.py`  runs the table over one input and returns the sdlora config dict and the rows.

Nothing here trains or loads a model; docs/kohya.md is the user's table.
"""
