"""HTTP generation with any live subset of a federation's concepts (Ray Serve).

`generator` is the model deployment that follows the coordinator (its per-sample subsets of concepts
are `blocklora.method.residual`, Ray-free), `ingress` the FastAPI front, `app` the bind line.
"""
