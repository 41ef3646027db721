"""eval-speed: the original and the new model on the same held-out text.

stage.py   the stage entry ``eval_speed(cfg, out)``: which models, which text, quality and speed per domain
speed.py   long-text decoding speed: pure measurement functions (no config, no files)
report.py  report.json's comparison per domain, report.md, table.md (for the model card), charts
"""
