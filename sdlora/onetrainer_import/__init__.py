"""`sdlora import-onetrainer`: OneTrainer's saved training config (its TrainConfig JSON, with the concepts and samples
inline or in the files it names) as an sdlora config that trains the same thing, with a table of every option.

- `read.py`     the files: the config (objects flattened to dotted options), concept and sample lists.
- `options.py`  THE table: OneTrainer option -> sdlora key, converter, or the reason it is not supported.
- `parts.py`    model types as sdlora families; the per-part settings (unet.*, text_encoder.*, ...).
- `optim.py`    the optimiser object (optimizer.*) and the schedule.
- `data.py`     concepts -> data.subsets (repeats, captions, augmentations), samples -> sample.entries.
- `convert.py`  runs the table over one config and returns the sdlora config dict, the rows and the refusals.

The rows, rule kinds and value readers are sdlora.kohya_import.rules'; the table printing, the schema check and the
atomic write sdlora.commands.import_common's. Nothing here trains or loads a model; docs/onetrainer.md is the
user's table.
"""
