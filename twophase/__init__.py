"""The machinery of two-phase fine-tuning, beside the scripts and the modules the top level shows
(train.py, evaluate.py, predict.py; model.py, data.py, utils.py)."""
