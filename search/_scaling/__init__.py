"""Scaling laws fitted to runs, one concept per module (the public names are re-exported by
`moeforge.search`):

- `errors`: the two ways a fit stops (bad input, exit 2; no convergence, exit 1).
- `laws`: each law a pure function of arrays with its constants and starting grid; `LAWS` maps names to them.
- `runs`: the fit's data, one entry per training run, read from a search (run dir, trials.json) or a CSV.
- `decisions`: decision accuracy at the held-out budget: the law's pairwise ranking against the next smaller
  budget's (DataDecide's baseline).
- `fit`: the Huber fit by L-BFGS-B, the bootstrap, the holdout, and `Fit` (fit.json); it knows no law.
- `predict`: the compute-optimal N, D (and G) at a budget under a fit, and the specs that realize it.
- `plots`: IsoFLOP curves, loss against G, extrapolation and residuals of any fit.
- `check`: a law checked at a new budget by training its optimum and the study's best with the study's own
  rules (the search's evaluator; imported only by `moeforge scaling check`, so fits import no torch).

Arrows point down this list: a module imports only those above it.
"""
