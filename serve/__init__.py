"""HTTP generation with any live subset of a federation's concepts (Ray Serve).

`residual` is the Ray-free math (per-sample subsets of concepts in one forward pass), `generator`
the model deployment that follows the coordinator, `ingress` the FastAPI front, `app` the bind line.
"""
