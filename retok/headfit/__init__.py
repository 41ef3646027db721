"""The head fit: head rows of new tokens fitted on the states the new model really produces, with the original model's
next-token distribution as a soft target. No backprop through the body: a softmax regression over cached
final hidden states, minutes on a CPU.

1. :func:`collect_states` runs the model (the frozen body with the new input rows) over text of EVERY
   training domain, so the new rows also learn where NOT to fire (English, code), and keeps each position's
   final state (float16), the next token, and, at the aligned teacher position, the original model's top-k
   next-OLD-token probabilities (retok.teacher.body, retok.teacher.alignment).
2. :func:`fit_rows` fits the rows that may learn (the new tokens') by cross-entropy on the next token, plus
   ``kl_weight`` x KL(teacher || student), where the student's distribution is marginalised onto first old
   pieces (a new token counts for the old token it starts with) over the teacher's top-k and one "rest"
   bucket. Rows that do not learn are constant, so their log-sum-exp is computed once per state and each step
   touches only the learning rows; its gradient is written out (``RowObjective.loss_and_grad``: a few passes
   over the batch's logits instead of autograd's dozens, 1.2x faster on the demo, tested equal to autograd's).
   Held-out states (every 20th window) stop the fit when it starts to overfit.

The tree terms (``tree_depth`` >= 1) go down the teacher's piece tree along the realised text: the teacher's
distribution over the piece after the realised first piece r1 (its state one old position later, no extra
forward pass) is matched by the student's mass of new tokens spelled (r1, q, ...), grouped by q and
renormalised over the keys both sides have; depth d conditions on r1..rd. A new token is a PATH of pieces, so
its row is pinned down by every piece of it, not only its first: on the demo depth 1 took the zh BPB after
init from 1.289x to 1.230x of the original's, on the same states.

The fit is data-bound (on the demo ~1.6 Chinese targets per new row), so the rows share what they learn: each
is its start + ``features @ map`` + its own residual, where the features are the original head rows of its first
piece and of its other pieces, and (``fit.input_feature``) the token's own input row (:func:`piece_features`),
and the map is one matrix for all new tokens. The map learns from the tokens the text shows how a spelling
(and what the input side learned) sets a row and applies it to those it shows rarely or not at all; on the
demo the pieces took zh after init from 1.230x to 1.175x, on the same states, and after train-io the input
row took zh from 1.113x to 1.095x (2 epochs).
"""

# The package: states.py collects the states and the teacher's targets, objective.py is the loss and its
# gradient, fit.py the fit itself, run.py runs it on a model for init-embeddings (fit.at_init) and train-io
# (fit.after_train), with the checks and budgets around it.
