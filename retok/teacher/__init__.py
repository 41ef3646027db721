"""The original model as a teacher, without a second model in memory: the same frozen body run with the OLD
embedding and head (body.py), and which old position each new position reads the same bytes as
(alignment.py). train-io's distillation and the head fit learn from it."""
