"""The toy world: procedural captioned pictures, the pretrained toy base made from them, and the
judge that scores pictures of it. Not part of the method; it exists so that the method's claims
can be tested by eye and by numbers on a machine with no real Stable Diffusion weights."""
