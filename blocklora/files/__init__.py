"""Reading and writing files safely, with no blocklora imports: safetensors without pickle and with
bounds (safefile.py), typed JSON metadata (schema.py), atomic writes (atomic.py), optimizer state as
tensors for resumable checkpoints (checkpoint.py). The concept artifact, which uses them, is
`blocklora.method.artifact`.
"""
